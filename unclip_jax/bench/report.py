"""The bench's report: ``BENCHMARKS.md`` (tables, machine and versions) and the same results as ``.json``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from unclip_jax.bench import workloads

HEADER = "# Benchmarks: unclip_jax vs diffusers/PyTorch (same weights, float32, 2 threads)"
TRAIN_NOTE = (
    "Ours: the train loop's jitted `train_step` (task loss incl. the decoder's hybrid loss, AdamW, global-norm "
    "clipping, EMA). Torch: the same work (`unclip_jax.bench.torch_train`): the same networks' forward/backward "
    "with the same loss (the decoder's hybrid loss with its learned-variance VLB term and CFG drops), "
    "`torch.optim.AdamW` (decay on ndim >= 2), clipping and the EMA update. "
    "Our FLOPs come from XLA's cost analysis; for the cascade (whose loops XLA does not cost) the torch "
    "FLOP count is used for both sides. *Peak: the XLA 1024x1024 f32 matmul measured inside the same "
    "job right after it (the machine's load drifts between jobs); the 2048 figure above when absent."
)

PROFILE_NOTE = (
    "Both steps profiled in one process (`python -m unclip_jax.bench --job=<task>:profile`): ours from a "
    "`jax.profiler` trace (one event per executed HLO instruction, put in a category from the optimised HLO: "
    "opcode, fused ops, convolution window, op name), PyTorch's from `torch.profiler` self times (each op in the "
    "category of its outermost recognised ancestor). PyTorch's oneDNN conv backward computes both gradients in "
    "one op. A fusion counts where its root op puts it. Milliseconds per step; each side's categories sum to its "
    "total op time (ours can exceed the wall time where XLA runs thunks concurrently)."
)


def fmt(v: Any, spec: str = ".2f") -> str:
    """``v`` formatted, or ``-`` when it is missing."""
    return "-" if v is None else format(v, spec)


def speedup(ours: dict[str, Any], ref: dict[str, Any]) -> float | None:
    """torch time / our time (> 1: we are faster), None unless both sides have a time."""
    if "seconds" in ours and "seconds" in ref:
        return ref["seconds"] / ours["seconds"]
    return None


def preamble(report: dict[str, Any]) -> list[str]:
    """Title, how the run was made, the machine, versions and the matmul peak."""
    mm = report.get("matmul", {})
    machine = report["machine"]
    return [
        HEADER,
        "",
        f"Written by `python -m unclip_jax.bench` ({'quick' if report['quick'] else 'full'} run, "
        f"{report['repeats']} repeats, medians after warm-up) on {report['date']}. "
        "Speed-up = torch time / our time (> 1: we are faster). Every row was measured in this one run; the "
        "machine is shared, so compare within a run.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in machine['load_avg_at_start'])}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"Matmul peak ({mm.get('size', '-')}x{mm.get('size', '-')} f32): XLA {fmt(mm.get('xla_gflops'), '.0f')} "
        f"GFLOP/s, numpy {fmt(mm.get('numpy_gflops'), '.0f')}, torch {fmt(mm.get('torch_gflops'), '.0f')}.",
        "",
    ]


def conv_section(conv: dict[str, Any]) -> list[str]:
    """The 3x3 conv micro-benchmark table."""
    lines = [
        "## 3x3 conv, forward + input grad + weight grad (`unclip_jax.layers.conv`)",
        "",
        "| shape (NHWC) | lax autodiff | custom_vjp | torch | custom_vjp vs lax | custom_vjp vs torch |",
        "|---|---|---|---|---|---|",
    ]
    if "error" in conv:
        lines.append(f"| failed: {conv['error']} | | | | | |")
    for r in conv.get("rows", []):
        cell = {
            k: f"{r[k]['seconds'] * 1e3:.1f} ms ({r[k]['gflops']:.0f} GF/s)" for k in ("lax", "custom_vjp", "torch")
        }
        lines.append(
            f"| {r['shape']} | {cell['lax']} | {cell['custom_vjp']} | {cell['torch']} | "
            f"x{r['lax']['seconds'] / r['custom_vjp']['seconds']:.2f} | "
            f"x{r['torch']['seconds'] / r['custom_vjp']['seconds']:.2f} |"
        )
    return [*lines, ""]


def workload_row(phase: str, res: dict[str, Any], peak: float | None) -> str:
    """One row of the train-step / cascade table."""
    ours, ref = res.get("jax", {}), res.get("torch", {})
    err = "; ".join(f"{side}: {r['error']}" for side, r in (("ours", ours), ("torch", ref)) if "error" in r)
    g_ours, g_ref = ours.get("gflops"), ref.get("gflops")
    pk_ours, pk_ref = ours.get("job_matmul_gflops") or peak, ref.get("job_matmul_gflops") or peak
    if phase == "cascade" and g_ours is None and ref.get("flops") and ours.get("seconds"):
        g_ours = ref["flops"] / ours["seconds"] / 1e9  # same work as torch's counted FLOPs
    ratio = speedup(ours, ref)
    return (
        f"| {workloads.title(phase)} | {fmt(ours.get('seconds'), '.3f')} | {fmt(ref.get('seconds'), '.3f')} | "
        f"{'x' + fmt(ratio) if ratio else '-'} | {fmt(g_ours, '.0f')} | "
        f"{fmt(g_ref, '.0f')} | {fmt(g_ours / pk_ours * 100 if g_ours and pk_ours else None, '.0f')}% / "
        f"{fmt(g_ref / pk_ref * 100 if g_ref and pk_ref else None, '.0f')}% | {fmt(ours.get('compile_s'), '.1f')} | "
        f"{fmt(ours.get('peak_rss_mb'), '.0f')} / {fmt(ref.get('peak_rss_mb'), '.0f')} | {err} |"
    )


def ab_row(phase: str, ab: dict[str, Any]) -> str | None:
    """One row of the lax / custom_vjp convolution A/B table (None when either side is missing)."""
    ours, lax_ = ab.get("custom_vjp", {}), ab.get("lax", {})
    if "seconds" not in ours or "seconds" not in lax_:
        return None
    return (
        f"| {phase} | {lax_['seconds']:.3f} | {ours['seconds']:.3f} | x{lax_['seconds'] / ours['seconds']:.2f} | "
        f"{fmt(lax_.get('compile_s'), '.1f')} / {fmt(ours.get('compile_s'), '.1f')} |"
    )


def export_section(res: dict[str, Any]) -> list[str]:
    """The export phase's table (:mod:`unclip_jax.bench.export_jobs`)."""
    if "error" in res:
        return ["## Export", "", f"error: {res['error']}", ""]
    formats = [name for name, r in res.items() if isinstance(r, dict)]
    rows = [
        f"| {name} | {fmt(res[name]['export_s'])} | {fmt(res[name]['size_mb'], '.1f')} | "
        f"{fmt(res[name]['load_run_s'])} | {res[name]['max_abs_diff']:.1e} |"
        for name in formats
    ]
    return [
        f"## Export of the `bench` decoder ({res['network']}, {res['params'] / 1e6:.1f}M parameters)",
        "",
        "| format | export s | size MB | load + first run s (batch 2) | max abs diff to Flax |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def profile_section(profiles: dict[str, dict[str, Any]]) -> list[str]:
    """One op-category table per train step, ours against PyTorch's (:mod:`unclip_jax.bench.profile`)."""
    from unclip_jax.bench.profile import profile_table

    lines = ["## Where the time goes: train steps op by op, ours vs PyTorch", "", PROFILE_NOTE, ""]
    for phase, res in profiles.items():
        if "error" in res:
            lines += [f"### {workloads.title(phase)}", "", f"failed: {res['error']}", ""]
        else:
            lines += profile_table(workloads.title(phase), res)
    return lines


def write_report(report: dict[str, Any], out: Path) -> None:
    """BENCHMARKS.md (tables + machine/versions) and BENCHMARKS.json next to it."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    results = report["results"]
    peak = report.get("matmul", {}).get("xla_gflops")
    lines = preamble(report)
    if results.get("conv"):
        lines += conv_section(results["conv"])
    phases = [p for p in (*workloads.TRAIN_PHASES, "cascade") if results.get(p)]
    rows = [workload_row(p, results[p], peak) for p in phases]
    ab = [ab_row(p, results[p]["conv_ab"]) for p in phases if "conv_ab" in results[p]]
    ab = [r for r in ab if r]
    if rows:
        lines += [
            "## Training steps and sampling",
            "",
            "| workload (`bench` variants) | ours s | torch s | speed-up | ours GFLOP/s | torch GFLOP/s | "
            "% of matmul peak* (ours / torch) | our compile s | peak RSS MB (ours / torch) | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            TRAIN_NOTE,
            "",
        ]
    if ab:
        lines += [
            "## U-Net train step: convolutions through `lax` autodiff vs the custom VJP (`unclip_jax.layers.conv`)",
            "",
            "Both steps compiled in one process and timed interleaved (same load); no buffer donation here.",
            "",
            "| stage | lax convs s | custom_vjp convs s | speed-up | compile s (lax / custom) |",
            "|---|---|---|---|---|",
            *ab,
            "",
        ]
    prof = [p for p in phases if results[p].get("profile")]
    if prof:
        lines += profile_section({p: results[p]["profile"] for p in prof})
    if results.get("export"):
        lines += export_section(results["export"])
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    kept = dated_sections(out.read_text()) if out.exists() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n{kept}" if kept else ""))


def dated_sections(text: str) -> str:
    """The sections of a previous report whose heading starts with a date (``## 2026-12-05 levers``): hand-written
    records of one-off measurements, carried over when the report is rewritten."""
    out, keep = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            keep = bool(re.match(r"## \d{4}-\d{2}-\d{2}\b", line))
        if keep:
            out.append(line)
    return "\n".join(out) + "\n" if out else ""
