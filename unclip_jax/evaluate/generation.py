"""Step 3 of the MS-COCO protocol: generated shards (`unclip_jax.evaluate.protocol`), and the pipeline as a generator.

:func:`generate_shards` samples each of this host's unfinished shards in fixed-size padded batches (seed
``shard_seed(seed, j, b)``), then stores the samples' Inception features and the CLIP embeddings of samples and
captions as one atomic ``gen_XXXXX.npz``. :func:`pipeline_generator` makes a `UnclipPipeline` such a generator,
batch-sharded over a device mesh through the pipeline's public compiled-plan entry point (`UnclipPipeline.program`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.evaluate.clip_score import cosine_similarity
from unclip_jax.evaluate.instruments import local_mesh
from unclip_jax.evaluate.protocol import (
    PROTOCOL,
    Generator,
    Instruments,
    Interrupted,
    ProtocolConfig,
    host_shards,
    shard_seed,
)
from unclip_jax.evaluate.reference import load_reference_shard
from unclip_jax.evaluate.storage import (
    ShardProgress,
    batched,
    check_or_write_identity,
    local_batch_size,
    normalise_json,
    process_count,
    process_index,
    save_npz,
)


def generate_shards(
    ref_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: ProtocolConfig,
    generator: Generator,
    instruments: Instruments,
    *,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> None:
    """Generates, featurises and CLIP-embeds this host's unfinished shards (one atomic ``gen_XXXXX.npz`` each).

    Args:
        ref_dir: a finished reference folder (:func:`prepare_reference`).
        run_dir: this run's folder.
        config: protocol settings (the same as the reference's).
        generator: the model (see :class:`Generator`).
        instruments: Inception features + CLIP scorer.
        progress: print a line per finished shard.
        stop_after_shards: raise `Interrupted` after this many new shards (tests of resumption).
    """
    ref_dir, run_dir = Path(ref_dir), Path(run_dir)
    batch = local_batch_size(config.batch_size)
    identity = {
        "protocol": PROTOCOL,
        "reference": json.loads((ref_dir / "reference.json").read_text()),
        "generation": generator.settings,
        "model": generator.model,
        "clip_model": instruments.clip.name,
        "inception": instruments.inception,
        "batch_size": batch,
    }
    check_or_write_identity(run_dir / "run.json", identity, "run")
    mine = host_shards(config.num_shards, process_index(), process_count())
    todo = [j for j in mine if not (run_dir / "shards" / f"gen_{j:05d}.npz").is_file()]
    prog = ShardProgress("generation", config.num_shards, len(todo), progress)
    size = config.image_size
    for count, j in enumerate(todo):
        if stop_after_shards is not None and count >= stop_after_shards:
            raise Interrupted(f"stopped after {count} generation shards")
        ref = load_reference_shard(ref_dir, j)
        captions = [str(c) for c in ref["captions"]]
        images = []
        for b, s in enumerate(range(0, len(captions), batch)):
            chunk = captions[s : s + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            out = np.asarray(generator.fn(padded, shard_seed(config.seed, j, b)))
            if out.dtype != np.uint8 or out.shape != (batch, size, size, 3):
                raise ValueError(
                    f"generate_fn returned {out.dtype} {out.shape}; expected uint8 {(batch, size, size, 3)} "
                    "(samples at the protocol's image_size, quantised as they would be saved)"
                )
            images.append(out[: len(chunk)])
        if captions:
            imgs = np.concatenate(images, axis=0)
            feats = batched(instruments.features, imgs, batch).astype(np.float32)
            img_emb = batched(instruments.clip.embed_images, imgs, batch).astype(np.float32)
            txt = np.asarray(captions + [captions[-1]] * ((-len(captions)) % batch))
            txt_emb = np.concatenate(
                [np.asarray(instruments.clip.embed_texts(list(txt[s : s + batch]))) for s in range(0, len(txt), batch)]
            )[: len(captions)].astype(np.float32)
            cos = cosine_similarity(img_emb, txt_emb)
        else:
            feats = img_emb = txt_emb = np.zeros((0, 0), np.float32)
            cos = np.zeros((0,), np.float64)
        save_npz(
            run_dir / "shards" / f"gen_{j:05d}.npz",
            positions=ref["positions"],
            captions=np.asarray(captions, dtype=str),
            features=feats,
            image_embeds=img_emb,
            text_embeds=txt_emb,
            cos=cos,
        )
        prog(j, len(captions))


def load_generated_shard(run_dir: str | os.PathLike, j: int) -> dict[str, np.ndarray]:
    path = Path(run_dir) / "shards" / f"gen_{j:05d}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: generation shard missing (the run is not finished)")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def settings_dict(settings: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Per-stage `StageSettings` (and extra fields) as JSON-ready dicts for the report (``StageSettings.describe``:
    the autoregressive prior's temperature / top-k / top-p appear when not at their defaults)."""

    def one(v: Any) -> Any:
        if hasattr(v, "describe"):
            return v.describe()
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v

    out = {k: one(v) for k, v in settings.items()}
    return normalise_json({"stages": out, **extra})


def pipeline_generator(
    pipe: Any,
    settings: Mapping[str, Any],
    *,
    model: Mapping[str, Any],
    num_candidates: int = 2,
    image_embed_source: str = "prior",
    stop_after: str | None = "super_res",
    mesh: Any = None,
) -> Generator:
    """A :class:`Generator` sampling an `UnclipPipeline` text -> image, the batch split over ``mesh``'s devices.

    The pipeline's program for these settings (`UnclipPipeline.program`) runs with the captions sharded along the
    batch and the variables replicated; the noise does not depend on the sharding (JAX's partitionable threefry), so
    the samples are those of the unsharded call.

    Args:
        pipe: the pipeline.
        settings: per-stage `StageSettings` (missing stages: the pipeline's defaults).
        model: its identity (`unclip_jax.evaluate.storage.model_identity`).
        num_candidates: prior candidates per caption (paper 2, Karlo 1), for the diffusion or the autoregressive prior
            (``pipe.prior_kind == "ar"``, recorded as ``prior_kind`` in the settings).
        image_embed_source: see `UnclipPipeline.__call__`.
        stop_after: last stage ("super_res": the 256x256 samples of the protocol; None: the last loaded).
        mesh: device mesh (default `unclip_jax.evaluate.instruments.local_mesh`; one device: no sharding).
    """
    from unclip_jax.pipeline import resolve_settings
    from unclip_jax.pipeline.images import to_uint8

    mesh = mesh if mesh is not None else local_mesh()
    full = resolve_settings(settings)
    kw = dict(num_candidates=num_candidates, image_embed_source=image_embed_source, stop_after=stop_after)
    extra = {}
    if image_embed_source == "prior" and pipe.prior_kind == "ar":
        extra["prior_kind"] = "ar"  # (the diffusion prior is the unmarked default)
    program = pipe.program("generate", full, mesh=mesh, **kw)

    def fn(captions: list[str], seed: int) -> np.ndarray:
        return to_uint8(program(pipe.text_inputs(captions), seed)["images"])

    return Generator(fn, settings_dict(full, **kw, **extra), dict(model))
