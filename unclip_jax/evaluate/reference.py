"""Step 2 of the MS-COCO protocol: the selected captions and the reference statistics (`unclip_jax.evaluate.protocol`).

The N selected val images, centre-cropped by the source, through the FID Inception, one resumable shard at a time;
the merged statistics are a pytorch-fid compatible ``reference_stats.npz`` (plus ``n``/``m2`` for exact merging)
with ``captions.jsonl`` and ``skipped.json`` beside it. Any number of runs (a guidance sweep) share one folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.evaluate.fid import FeatureStats, merge_stats
from unclip_jax.evaluate.protocol import (
    PROTOCOL,
    FeatureFn,
    Interrupted,
    ProtocolConfig,
    host_shards,
    pick_caption,
    select_items,
)
from unclip_jax.evaluate.storage import (
    ShardProgress,
    barrier,
    batched,
    check_or_write_identity,
    local_batch_size,
    process_count,
    process_index,
    save_npz,
    sha256_file,
    write_json,
    write_text,
)


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
    check_or_write_identity(ident_path, identity, "reference")
    items, u = select_items(int(num_items), config.num_captions, config.seed)
    mine = host_shards(config.num_shards, process_index(), process_count())
    todo = [j for j in mine if not (ref_dir / "shards" / f"ref_{j:05d}.npz").is_file()]
    batch = local_batch_size(config.batch_size)
    prog = ShardProgress("reference", config.num_shards, len(todo), progress)
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
            feats = batched(features_fn, np.stack(rows["images"]), batch).astype(np.float32)
        else:
            feats = np.zeros((0, 0), np.float32)
        save_npz(
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
    barrier("unclip_evaluate_reference_shards")
    if process_index() == 0 and not stats_path.is_file():
        finalise_reference(ref_dir, config)
    barrier("unclip_evaluate_reference_stats")
    return reference_summary(ref_dir)


def load_reference_shard(ref_dir: str | os.PathLike, j: int) -> dict[str, np.ndarray]:
    """One reference shard as a dict of arrays (``captions``, ``features``, ``positions``, ...)."""
    path = Path(ref_dir) / "shards" / f"ref_{j:05d}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference shard missing (run the reference step to completion first)")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def finalise_reference(ref_dir: Path, config: ProtocolConfig) -> None:
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
    write_text(ref_dir / "captions.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
    write_json(ref_dir / "skipped.json", skipped)


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
        "stats_sha256": sha256_file(stats),
        "num_images": n,
        "skipped": skipped,
        "identity": json.loads((ref_dir / "reference.json").read_text()),
    }


def load_captions(ref_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The selected captions (``captions.jsonl``: position, item, id, caption, shard), in selection order."""
    path = Path(ref_dir) / "captions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
