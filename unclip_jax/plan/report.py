"""Plain-text and markdown renderings of plans (:func:`unclip_jax.plan.train_step.plan_train` results)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unclip_jax.chips import GIB

ESTIMATE_NOTE = (
    "Compile-time estimates, not measured runs: XLA's TPU compiler (libtpu) compiled each train step for the slice "
    "on a CPU machine; memory is the compiled program's, FLOPs and bytes are XLA's cost analysis per chip, the "
    "roofline is max(FLOPs / peak bf16, bytes / HBM bandwidth) and days are total_steps x max(FLOPs / (peak x MFU), roofline)."
)


CASCADE_NOTE = (
    "compile-time estimates, not measured runs: memory is the compiled program's; one sampling step of a stage is "
    "the difference of XLA's cost analysis of the programs stopped after and before it, times the stage's step count"
)


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def compiled(plan: dict[str, Any]) -> bool:
    """Whether a plan holds the compiled program's numbers (a ``--nocompile`` plan has the layout only)."""
    return "memory" in plan


def _mesh(plan: dict[str, Any]) -> str:
    m = plan["mesh"]
    return "x".join(str(m[k]) for k in ("data", "fsdp", "tensor"))


def _host(plan: dict[str, Any]) -> str:
    """``, peak host memory N GiB`` where the plan recorded it (rows compiled before it was recorded have none)."""
    return f", peak host memory {plan['host_peak_gib']:.1f} GiB" if "host_peak_gib" in plan else ""


def format_train(plan: dict[str, Any]) -> str:
    """The human-readable report of one train plan."""
    b, c, f = plan["bytes_per_chip"], plan["bytes_total"], plan["fsdp_check"]
    lines = [
        f"{plan['task']}:{plan['variant']} on {plan['topology']}: {plan['chips']} x {plan['device_kind']} "
        f"({plan['chip']}, {plan['hbm_gib']:.0f} GiB HBM)",
        f"  mesh data x fsdp x tensor = {_mesh(plan)}, rules {plan['rules']!r}; batch {plan['batch_size']} "
        f"(accumulation {plan['grad_accum_steps']}), remat {plan['remat']}, {plan['dtype']} compute / "
        f"{plan['param_dtype']} params, {plan['parameters'] / 1e6:.1f}M parameters",
        "  per chip (GiB; of the total):",
        f"    params {gib(b['params'])} of {gib(c['params'])}, optimizer {gib(b['opt_state'])} of "
        f"{gib(c['opt_state'])}, EMA {gib(b['ema'])} of {gib(c['ema'])}, batch {gib(b['batch'])} of {gib(c['batch'])}",
        f"  fsdp bound: params+optimizer+EMA per chip {gib(f['state_per_chip'])} GiB <= 1.1 x total / "
        f"{f['shard_ways']} = {gib(f['bound'])} GiB: " + ("ok" if f["ok"] else "FAILS (replicated by accident?)"),
    ]
    if not f["ok"]:
        for row in f["largest_replicated"]:
            lines.append(f"    replicated: {row['path']} {tuple(row['shape'])} {row['bytes'] / 2**20:.1f} MiB")
    if not compiled(plan):
        return "\n".join([*lines, "  (layout only: not compiled)"])
    m, r = plan["memory"], plan["roofline"]
    lines += [
        f"  compiled, per chip: arguments {gib(m['argument'])}, outputs {gib(m['output'])}, aliased {gib(m['alias'])}, "
        f"temporaries {gib(m['temp'])}, code {gib(m['generated_code'])}",
        f"    used {gib(m['used'])} of {plan['hbm_gib']:.0f} GiB: "
        + ("fits with >= 10% headroom" if plan["fits"] else "DOES NOT FIT with 10% headroom")
        + f" ({100 * plan['headroom']:.0f}% free)",
        f"  per chip per step: {plan['flops_per_chip'] / 1e12:.2f} TFLOP, {plan['bytes_accessed_per_chip'] / GIB:.1f} "
        f"GiB accessed",
        f"  roofline step {r['step_s']:.3f} s (compute {r['compute_s']:.3f} s, memory {r['memory_s']:.3f} s); at "
        f"{100 * plan['mfu']:.0f}% MFU {plan['step_s_at_mfu']:.3f} s/step, {plan['days_at_mfu']:.1f} days for "
        f"{plan['total_steps']:,} steps",
        f"  (compiled in {plan['compile_s']:.0f} s{_host(plan)}; {ESTIMATE_NOTE})",
    ]
    return "\n".join(lines)


def markdown_table(plans: Sequence[dict[str, Any]]) -> str:
    """One row per stage x topology: mesh, settings, state and GiB used / HBM, TFLOP per step, step time, days.

    Rows that were laid out but not (yet) compiled show the sharded state only.
    """
    head = (
        "| stage | topology | mesh d x f x t | batch (accum) | remat | state GiB / chip | fsdp bound | GiB used / HBM "
        "| fits | TFLOP / chip / step | roofline step | step @ MFU | days @ MFU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for p in plans:
        if p.get("error"):
            rows.append(f"| {p['stage']} | {p['topology']} | error: {p['error']} |" + " |" * 10)
            continue
        f = p["fsdp_check"]
        cells = [
            p["stage"],
            f"{p['topology']} ({p['chips']})",
            _mesh(p),
            f"{p['batch_size']} ({p['grad_accum_steps']})",
            "yes" if p["remat"] else "no",
            gib(f["state_per_chip"]),
            "ok" if f["ok"] else "**fails**",
        ]
        if compiled(p):
            cells += [
                f"{gib(p['memory']['used'])} / {p['hbm_gib']:.0f}",
                "yes" if p["fits"] else "**no**",
                f"{p['flops_per_chip'] / 1e12:.1f}",
                f"{p['roofline']['step_s']:.2f} s",
                f"{p['step_s_at_mfu']:.2f} s ({100 * p['mfu']:.0f}%)",
                f"{p['days_at_mfu']:.1f}",
            ]
        else:
            cells += [f"? / {p['hbm_gib']:.0f}", "not compiled yet", "", "", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_cascade(plan: dict[str, Any]) -> str:
    """The human-readable report of one cascade plan (:func:`unclip_jax.plan.cascade.plan_cascade`)."""
    m = plan["memory"]
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in plan["params"].items())
    lines = [
        f"cascade {plan['variant']} on one chip of {plan['topology']} ({plan['device_kind']}, {plan['hbm_gib']:.0f} "
        f"GiB HBM): batch {plan['batch']}, {plan['dtype']} weights and compute, {plan['num_candidates']} prior "
        f"candidates, up to {plan['stop_after']}",
        f"  parameters: {params}",
        f"  compiled: arguments {gib(m['argument'])}, temporaries {gib(m['temp'])}, code {gib(m['generated_code'])}; "
        f"used {gib(m['used'])} of {plan['hbm_gib']:.0f} GiB: "
        + ("fits with >= 10% headroom" if plan["fits"] else "DOES NOT FIT with 10% headroom"),
    ]
    for stage, s in plan["stages"].items():
        extra = " (with the text encoder)" if stage == "prior" else ""
        lines.append(
            f"  {stage}: {s['steps']} steps ({s['sampler']}, {s['spacing']}), {s['flops_per_step'] / 1e12:.3f} TFLOP "
            f"and {s['bytes_per_step'] / GIB:.2f} GiB per step{extra}; roofline {s['roofline_s']:.2f} s, at "
            f"{100 * plan['mfu']:.0f}% MFU {s['s_at_mfu']:.2f} s"
        )
    lines += [
        f"  per image: {plan['s_per_image_roofline']:.2f} s at the roofline, {plan['s_per_image_at_mfu']:.2f} s at "
        f"{100 * plan['mfu']:.0f}% MFU",
        f"  (compiled in {plan['compile_s']:.0f} s{_host(plan)}; {CASCADE_NOTE})",
    ]
    return "\n".join(lines)


def markdown_serving(plans: Sequence[dict[str, Any]]) -> str:
    """One row per cascade plan: chip, batch, GiB used / HBM, and per-image seconds (each stage and in total)."""
    head = (
        "| cascade | chip | batch | GiB used / HBM | fits | prior s | decoder s | super-res s | 1024 s | s / image "
        "(roofline) | s / image @ MFU |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for p in plans:
        if p.get("error"):
            rows.append(f"| {p.get('variant', '?')} | {p['topology']} | error: {p['error']} |" + " |" * 8)
            continue
        st = p["stages"]
        per = [
            f"{st[s]['s_at_mfu'] / p['batch']:.2f}" if s in st else ""
            for s in ("prior", "decoder", "super_res", "upsampler_1024")
        ]
        rows.append(
            "| "
            + " | ".join(
                [
                    p["variant"],
                    f"{p['topology']} ({p['device_kind']})",
                    str(p["batch"]),
                    f"{gib(p['memory']['used'])} / {p['hbm_gib']:.0f}",
                    "yes" if p["fits"] else "**no**",
                    *per,
                    f"{p['s_per_image_roofline']:.2f}",
                    f"{p['s_per_image_at_mfu']:.2f} ({100 * p['mfu']:.0f}%)",
                ]
            )
            + " |"
        )
    return "\n".join(rows)
