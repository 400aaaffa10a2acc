"""Guidance sweeps: FID and CLIP score against decoder (and prior) guidance scale (the paper's figure 11).

Figure 11 of Ramesh et al. 2022 plots MS-COCO FID against the decoder's classifier-free guidance scale: guidance
costs unCLIP far less FID than GLIDE because the scene is fixed by z_i. :func:`run_sweep` runs the MS-COCO protocol
(:func:`unclip_jax.evaluate.report.evaluate`) once per (decoder scale, prior scale) point, every point sharing one
reference folder (statistics computed once) and resuming like a single run (finished points only recompute their
report), then writes

- ``sweep.json``: one row per point (scales, FID, KID, CLIP score raw and Hessel, N, run folder) + the settings;
- ``sweep.md``: the same as a markdown table;
- ``sweep.png``: FID and CLIP score against guidance (one line per value of the other scale), matplotlib Agg.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unclip_jax.evaluate import protocol
from unclip_jax.evaluate.report import evaluate
from unclip_jax.evaluate.storage import process_index, write_json, write_text

COLUMNS = (
    ("decoder_guidance", "decoder guidance"),
    ("prior_guidance", "prior guidance"),
    ("fid", "FID"),
    ("kid_mean", "KID"),
    ("clip_score_raw", "CLIP score"),
    ("clip_score_hessel", "CLIP score (Hessel)"),
    ("num_generated", "N"),
)


def sweep_points(decoder_scales: Sequence[float], prior_scales: Sequence[float | None] = (None,)) -> list[dict]:
    """Every (decoder, prior) combination, decoder scale varying fastest. A prior scale None keeps the default."""
    if not decoder_scales:
        raise ValueError("sweep_points: give at least one decoder guidance scale")
    return [
        {"decoder": float(d), "prior": None if p is None else float(p)}
        for p, d in itertools.product(prior_scales or (None,), decoder_scales)
    ]


def _fmt(x: float | None) -> str:
    return "default" if x is None else f"{x:g}"


def point_name(point: dict) -> str:
    """Folder name of a sweep point, e.g. ``decoder_1.25__prior_4``."""
    return f"decoder_{_fmt(point['decoder'])}__prior_{_fmt(point['prior'])}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep rows as a markdown table (:data:`COLUMNS`)."""

    def cell(k: str, v: Any) -> str:
        if k.endswith("_guidance"):
            return _fmt(v)
        if v is None:
            return "default"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}"
        return str(v)

    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(cell(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "MS-COCO zero-shot") -> Path:
    """FID and CLIP score against guidance scale (figure 11 style) as a PNG (matplotlib, Agg backend).

    The x axis is the decoder scale when it varies (one line per prior scale), otherwise the prior scale.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    decs = sorted({r["decoder_guidance"] for r in rows if r["decoder_guidance"] is not None})
    x_key, s_key = (
        ("decoder_guidance", "prior_guidance")
        if len(decs) > 1 or len(rows) == 1
        else ("prior_guidance", "decoder_guidance")
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for value in sorted({r[s_key] for r in rows}, key=lambda v: -math.inf if v is None else v):
        sel = sorted((r for r in rows if r[s_key] == value), key=lambda r: r[x_key] or 0.0)
        xs = [r[x_key] if r[x_key] is not None else float("nan") for r in sel]
        label = f"{s_key.replace('_', ' ')} {_fmt(value)}"
        axes[0].plot(xs, [r["fid"] for r in sel], marker="o", label=label)
        axes[1].plot(xs, [r["clip_score_raw"] for r in sel], marker="o", label=label)
    for ax, name in zip(axes, ("FID (lower is better)", "CLIP score (raw cosine)"), strict=True):
        ax.set_xlabel(x_key.replace("_", " ") + " scale")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def row_of(point: dict, report: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    r = report["results"]
    return {
        "decoder_guidance": point["decoder"],
        "prior_guidance": point["prior"],
        "fid": r["fid"],
        "kid_mean": r["kid_mean"],
        "kid_std": r["kid_std"],
        "clip_score_raw": r["clip_score_raw"],
        "clip_score_hessel": r["clip_score_hessel"],
        "num_generated": report["num_generated"],
        "run_dir": str(run_dir),
    }


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Path]:
    """Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sweep.json", "markdown": out_dir / "sweep.md", "plot": out_dir / "sweep.png"}
    write_json(paths["json"], {**meta, "rows": list(rows)})
    md = f"# Guidance sweep: {meta.get('title', 'MS-COCO zero-shot')}\n\n" + markdown_table(rows)
    md += f"\nCLIP model: {meta.get('clip_model')}; Inception: {meta.get('inception', {}).get('variant')}\n"
    write_text(paths["markdown"], md)
    plot(rows, paths["plot"], title=meta.get("title", "MS-COCO zero-shot"))
    return paths


def run_sweep(
    source_fn: Callable[[], Any],
    ref_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: protocol.ProtocolConfig,
    points: Sequence[dict],
    make_generator: Callable[[dict], protocol.Generator],
    instruments: protocol.Instruments,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the protocol at every point and writes the table and plot.

    Args:
        source_fn, ref_dir, config, instruments: as :func:`unclip_jax.evaluate.report.evaluate`.
        out_dir: sweep folder; point ``p`` runs in ``out_dir/points/<point_name(p)>``.
        points: ``{"decoder": scale, "prior": scale or None}`` (:func:`sweep_points`).
        make_generator: point -> :class:`~unclip_jax.evaluate.protocol.Generator` sampling with those scales.
        progress: progress lines.

    Returns:
        ``{"rows": [...], "paths": {"json", "markdown", "plot"}}``.
    """
    out_dir = Path(out_dir)
    rows, reports = [], []
    for i, point in enumerate(points):
        run_dir = out_dir / "points" / point_name(point)
        if progress:
            print(f"[sweep] point {i + 1}/{len(points)}: {point_name(point)}", flush=True)
        report = evaluate(source_fn, ref_dir, run_dir, config, make_generator(point), instruments, progress=progress)
        reports.append(report)
        rows.append(row_of(point, report, run_dir))
    meta = {
        "title": f"MS-COCO zero-shot, N={config.num_captions}",
        "clip_model": reports[0]["clip_model"],
        "inception": reports[0]["inception"],
        "model": reports[0]["model"],
        "reference": reports[0]["reference"]["stats"],
        "config": reports[0]["config"],
    }
    paths = write_outputs(rows, out_dir, meta) if process_index() == 0 else {}
    if progress and paths:
        print(f"[sweep] wrote {paths['markdown']}, {paths['json']}, {paths['plot']}", flush=True)
    return {"rows": rows, "paths": paths}
