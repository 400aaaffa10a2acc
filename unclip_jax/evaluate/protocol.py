"""The MS-COCO 30k zero-shot protocol (paper section 5, table 2): FID, KID and CLIP score of text-to-image samples.

The convention of the GLIDE / DALL-E 2 / Karlo lineage:

1. **Captions**: N (30,000) images of COCO val2014 are drawn without replacement with a fixed seed, and one caption
   of each is drawn with the same generator (:func:`select_items`), so every image contributes exactly one caption.
2. **Reference**: those N val images, resized (short side 256, BOX-halving then bicubic) and centre-cropped
   (guided-diffusion ``center_crop_arr``, done by the source: :func:`unclip_jax.input.validate.center_crop_arr`),
   through the FID Inception; the statistics are cached as a pytorch-fid compatible ``reference_stats.npz``
   (``mu``/``sigma``; plus ``n``/``m2`` for exact merging) with ``captions.jsonl`` beside it, in a reference folder
   that any number of runs (a guidance sweep) share.
3. **Generation**: the N captions through the model at 256x256 (``generate_fn``), then pool3 features of the uint8
   samples and CLIP embeddings of samples and captions.
4. **Report**: FID (pytorch-fid's Frechet distance in float64), KID, CLIP score (raw mean cosine, as Karlo reports
   it, and Hessel et al.'s ``100 * max(cos, 0)``), with every setting and the identity of the model, the CLIP model
   and the Inception weights, as ``report.json``.

Work is cut into shards of ``shard_size`` consecutive selected images. Shard ``j`` belongs to JAX process
``j % process_count`` (hosts take disjoint shards and need a shared file system for the output folders); within a
host, batches are split over the host's devices (``mesh``). Every finished shard is one ``.npz`` written atomically
(temporary name + rename), so a killed run resumes where it stopped without redoing finished shards; resuming with
different settings is refused (``run.json`` / ``reference.json`` are compared). The randomness of shard ``j``, batch
``b`` comes from ``SeedSequence([seed, j, b])`` and every batch is padded to the same size, so a resumed run gives
bit-identical features (hence the same FID) as an uninterrupted one.

The steps live in their own modules: :mod:`unclip_jax.evaluate.reference` (captions and reference statistics),
:mod:`unclip_jax.evaluate.generation` (generated shards; :func:`~unclip_jax.evaluate.generation.pipeline_generator`
samples an `UnclipPipeline`), :mod:`unclip_jax.evaluate.report` (the report, and :func:`~unclip_jax.evaluate.report.
evaluate`: the whole protocol), :mod:`unclip_jax.evaluate.instruments` (Inception and CLIP) and
:mod:`unclip_jax.evaluate.storage` (atomic files, identities, hosts). This module holds what defines the protocol:
its settings, its interfaces and its deterministic choices.

Layout::

    REF_DIR/reference.json  shards/ref_00000.npz ...  reference_stats.npz  captions.jsonl
    RUN_DIR/run.json        shards/gen_00000.npz ...  report.json
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

DEFAULT_NUM_CAPTIONS = 30_000
PROTOCOL = "mscoco_val2014_zero_shot"

GenerateFn = Callable[[list[str], int], np.ndarray]
FeatureFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Settings that define the protocol (and the reference statistics).

    Attributes:
        num_captions: N captions / images (30,000).
        seed: seed of the caption selection and of generation.
        image_size: side of the reference crops and of the generated samples (256).
        shard_size: selected images per shard (the unit of resumption and of host sharding).
        batch_size: captions per generation call (per host); rounded up to a multiple of the host's device count.
        kid_subsets, kid_subset_size: KID subsets (100 of min(N, 1000)).
        precision_recall: also compute improved precision/recall (k = 3; O(N^2) distances, slow at 30k).
    """

    num_captions: int = DEFAULT_NUM_CAPTIONS
    seed: int = 0
    image_size: int = 256
    shard_size: int = 250
    batch_size: int = 8
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    precision_recall: bool = False

    def __post_init__(self) -> None:
        for f in ("num_captions", "image_size", "shard_size", "batch_size", "kid_subsets", "kid_subset_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"ProtocolConfig.{f}={getattr(self, f)}: must be >= 1")
        if self.num_captions < 2:
            raise ValueError(f"ProtocolConfig.num_captions={self.num_captions}: FID needs at least 2 samples")

    @property
    def num_shards(self) -> int:
        return -(-self.num_captions // self.shard_size)

    def shard_positions(self, j: int) -> range:
        """Positions (in the sorted selection) of shard ``j``."""
        return range(j * self.shard_size, min((j + 1) * self.shard_size, self.num_captions))


@dataclasses.dataclass
class Generator:
    """What produces the samples, and what identifies it in the report.

    Attributes:
        fn: ``(captions [B], seed) -> uint8 [B, S, S, 3]``; always called with exactly the protocol's batch size.
        settings: sampling settings (per-stage steps / sampler / eta / guidance, candidates, ...).
        model: model identity (component folders and hashes of their weight files; see :func:`model_identity`).
    """

    fn: GenerateFn
    settings: dict[str, Any]
    model: dict[str, Any]


@dataclasses.dataclass
class ClipScorer:
    """CLIP embedding functions for the CLIP score; ``name`` goes into the report.

    Attributes:
        name: CLIP model identity (e.g. a folder and its hash, or "openai/clip-vit-large-patch14").
        embed_images: uint8 ``[B, H, W, 3]`` -> ``[B, D]``.
        embed_texts: captions ``[B]`` -> ``[B, D]``.
    """

    name: str
    embed_images: Callable[[np.ndarray], np.ndarray]
    embed_texts: Callable[[list[str]], np.ndarray]


@dataclasses.dataclass
class Instruments:
    """The measuring instruments: Inception features and the CLIP scorer, with their identities."""

    features: FeatureFn
    inception: dict[str, Any]
    clip: ClipScorer


class Interrupted(RuntimeError):
    """Raised by ``stop_after_shards`` (simulated kill in tests)."""


# ----------------------------------------------------------------------------------------------------- choices
def select_items(num_items: int, num_captions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which images, and which of their captions, the protocol uses.

    ``rng = default_rng(seed)``; ``items = sort(rng.choice(num_items, N, replace=False))`` (one caption per image),
    then ``u = rng.random(N)``: image ``items[k]`` uses caption ``floor(u[k] * its number of captions)``.

    Args:
        num_items: images in the pool (40,504 for val2014).
        num_captions: N.
        seed: selection seed.

    Returns:
        ``(items [N] int64 sorted, u [N] float64 in [0, 1))``.
    """
    if num_captions > num_items:
        raise ValueError(f"select_items: {num_captions} captions requested but the pool has only {num_items} images")
    rng = np.random.default_rng(seed)
    items = np.sort(rng.choice(num_items, num_captions, replace=False)).astype(np.int64)
    return items, rng.random(num_captions)


def pick_caption(num: int, u: float) -> int:
    """Index of the caption drawn by ``u`` among ``num`` captions."""
    return min(int(u * num), num - 1)


def shard_seed(seed: int, shard: int, batch: int) -> int:
    """The generation seed of batch ``batch`` of shard ``shard`` (independent of which host or run makes it)."""
    return int(np.random.SeedSequence([seed, shard, batch]).generate_state(1)[0] >> 1)  # < 2**31: any PRNGKey


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shards of one host: ``j % process_count == process_index`` (disjoint, together all shards)."""
    return [j for j in range(num_shards) if j % process_count == process_index]
