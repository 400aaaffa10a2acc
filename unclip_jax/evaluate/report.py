"""Step 4 of the MS-COCO protocol, and the whole: :func:`compute_report` and :func:`evaluate`
(`unclip_jax.evaluate.protocol`).

The report merges every shard's feature statistics (float64) into FID, computes KID, the CLIP score (raw mean
cosine and Hessel's) and optionally improved precision/recall, and records every setting and the identity of the
model, the CLIP model, the Inception weights and the reference as ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.evaluate.clip_score import ClipScoreStats
from unclip_jax.evaluate.fid import FeatureStats, fid_from_stats, merge_stats
from unclip_jax.evaluate.generation import generate_shards, load_generated_shard
from unclip_jax.evaluate.kid import kernel_inception_distance, precision_recall
from unclip_jax.evaluate.protocol import PROTOCOL, Generator, Instruments, ProtocolConfig
from unclip_jax.evaluate.reference import load_reference_shard, prepare_reference, reference_summary
from unclip_jax.evaluate.storage import barrier, normalise_json, process_index, write_json


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
    report = normalise_json(report)
    write_json(run_dir / "report.json", report)
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
    barrier("unclip_evaluate_generation")
    timing = {"reference_s": t1 - t0, "generation_s": t2 - t1}
    if process_index() == 0:
        report = compute_report(ref_dir, run_dir, config, extra={"timing_this_session": timing})
        if progress:
            r = report["results"]
            print(
                f"[evaluate] {run_dir}: FID {r['fid']:.3f}  KID {r['kid_mean']:.5f}  "
                f"CLIP score {r['clip_score_raw']:.4f} (Hessel {r['clip_score_hessel']:.2f}, {report['clip_model']})",
                flush=True,
            )
    barrier("unclip_evaluate_report")
    return json.loads((Path(run_dir) / "report.json").read_text())
