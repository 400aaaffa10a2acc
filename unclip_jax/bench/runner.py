"""The bench's driver: every measurement in its own subprocess, the results gathered into one report.

``python -m unclip_jax.bench`` runs the phases in order; each measurement is a job
(``python -m unclip_jax.bench --job=<name>``, see :func:`run_job`) that writes ``<workdir>/<name>.json``, so its
peak memory is its own. Our train and cascade jobs run before their PyTorch counterparts: they write the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from unclip_jax.bench import workloads
from unclip_jax.bench.measure import TORCH_THREADS
from unclip_jax.bench.micro import CONV_SHAPES, CONV_SHAPES_ENV, MATMUL_N, MATMUL_N_ENV

PHASES: tuple[str, ...] = ("conv", *workloads.TRAIN_PHASES, "cascade", "export")
SINGLE_JOB_PHASES = ("conv", "export")  # one job, ours only
VERSIONS = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy")


def run_job(name: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """One measurement in this process: ``matmul``, ``conv``, ``export``, ``cascade:jax|torch`` or
    ``<task>:jax|torch|ab|profile``."""
    from unclip_jax.bench import export_jobs, jax_jobs, micro, profile, torch_jobs

    if name == "matmul":
        return micro.job_matmul(workdir, repeats)
    if name == "conv":
        return micro.job_conv(workdir, repeats)
    if name == "export":
        return export_jobs.job_export(workdir, repeats)
    phase, side = name.split(":")
    if phase == "cascade":
        return (jax_jobs.job_cascade if side == "jax" else torch_jobs.job_cascade)(workdir, repeats)
    if side == "profile":
        return profile.job_profile(phase, workdir, repeats)
    if side == "ab":
        return jax_jobs.job_train_ab(phase, workdir, repeats)
    return (jax_jobs.job_train if side == "jax" else torch_jobs.job_train)(phase, workdir, repeats)


def job_file(workdir: Path, name: str) -> Path:
    """Where job ``name`` writes its result."""
    return workdir / f"{name.replace(':', '_')}.json"


def subprocess_job(name: str, workdir: Path, repeats: int, timeout: float) -> dict[str, Any]:
    """Runs job ``name`` in a fresh Python process; its result, with ``wall_s``, or ``{"error": ...}``."""
    out = job_file(workdir, name)
    cmd = [sys.executable, "-m", "unclip_jax.bench", f"--job={name}", f"--workdir={workdir}", f"--repeats={repeats}"]
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"[bench] {name} FAILED: {' | '.join(tail)}", flush=True)
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    print(f"[bench] {name} done in {wall:.0f} s", flush=True)
    return result


def versions() -> dict[str, str]:
    """Python's and the measured libraries' versions (``-`` when not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in VERSIONS:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def machine() -> dict[str, Any]:
    """CPU model, core count, load average at start and PyTorch's thread count."""
    cpu = platform.processor() or "-"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "torch_threads": TORCH_THREADS,
    }


def run_phases(phases: list[str], repeats: int, cascade_repeats: int, timeout: float) -> dict[str, Any]:
    """The matmul peak and every phase's jobs in one temporary work directory; the report dict (without header)."""
    report: dict[str, Any] = {"results": {}}
    with tempfile.TemporaryDirectory(prefix="unclip_bench_") as tmp:
        workdir = Path(tmp)
        report["matmul"] = subprocess_job("matmul", workdir, repeats, timeout)
        for phase in phases:
            if phase in SINGLE_JOB_PHASES:
                report["results"][phase] = subprocess_job(phase, workdir, repeats, timeout)
                continue
            r = cascade_repeats if phase == "cascade" else repeats
            ours = subprocess_job(f"{phase}:jax", workdir, r, timeout)
            ref = (
                subprocess_job(f"{phase}:torch", workdir, r, timeout)
                if "error" not in ours
                else {"error": "not run: our side failed (it writes the weights)"}
            )
            report["results"][phase] = {"jax": ours, "torch": ref}
            if phase in workloads.TRAIN and "error" not in ours:
                report["results"][phase]["profile"] = subprocess_job(f"{phase}:profile", workdir, 2, timeout)
            if phase in workloads.TRAIN and workloads.TRAIN[phase].conv_ab and "error" not in ours:
                report["results"][phase]["conv_ab"] = subprocess_job(f"{phase}:ab", workdir, r + 1, timeout)
    return report


def make_parser(description: str = "") -> argparse.ArgumentParser:
    """The command line of ``python -m unclip_jax.bench``."""
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.bench", description=description)
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown report; the JSON goes next to it")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (iteration, tests)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 5, quick 2; cascade 3/1)")
    parser.add_argument("--conv-shapes", default=CONV_SHAPES, help="conv micro-benchmark shapes BxHxWxCinxCout,...")
    parser.add_argument("--matmul-size", type=int, default=MATMUL_N, help="n of the n x n matmul peak")
    parser.add_argument("--job", default="", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement subprocess")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the bench (or, with ``--job``, one measurement) and writes ``--out`` and its ``.json``."""
    from unclip_jax import bench
    from unclip_jax.bench.report import write_report

    parser = make_parser((bench.__doc__ or "").split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.job:
        workdir = Path(args.workdir)
        result = run_job(args.job, workdir, args.repeats)
        job_file(workdir, args.job).write_text(json.dumps(result, default=float))
        return 0

    os.environ[CONV_SHAPES_ENV] = args.conv_shapes  # read by the job subprocesses
    os.environ[MATMUL_N_ENV] = str(args.matmul_size)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown phase(s) {unknown}; expected a subset of {list(PHASES)}")
    out_dir = Path(args.out).resolve().parent  # checked before the measurements, which take minutes
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        parser.error(f"--out {args.out}: the folder {out_dir} does not exist or is not writable")
    repeats = args.repeats or (2 if args.quick else 5)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine(),
        "versions": versions(),
    }
    report.update(run_phases(phases, repeats, args.repeats or (1 if args.quick else 3), args.timeout))
    out = Path(args.out)
    write_report(report, out)
    print(out.read_text())
    return 0
