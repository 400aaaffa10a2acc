"""``make plan``: the README's "Scale out" table, one ``unclip plan`` per stage x TPU slice at the paper variants.

    python -m unclip_jax.plan.table [--only=decoder] [--force]       # what `make plan` runs (niced)

Every row is first laid out (``--nocompile``: the sharded state and the fsdp bound, seconds), then compiled, one
``unclip plan`` process (:mod:`unclip_jax.plan.commands`) at a time; its JSON lands in
``data/plan/<stage>_<slice>.json`` and is reused while the row's settings are unchanged (``--force`` recompiles),
so an interrupted run resumes. ``PLAN.md`` (markdown) and ``data/plan/plan.json`` (all rows) are then written from
whatever rows exist. A big step compiles for many minutes on a small machine: the compiles share the plans'
persistent XLA cache.

:data:`ROWS` are every stage's ``experiments/<stage>.py:paper@<slice>``: the settings with which a step fits a slice
are written once, in :data:`unclip_jax.train.defaults.SLICES`, and the table compiles exactly what a user would run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from unclip_jax.plan import report
from unclip_jax.train.defaults import SLICES, TOPOLOGIES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO, "data", "plan")
MARKDOWN = os.path.join(REPO, "PLAN.md")


@dataclasses.dataclass(frozen=True)
class Row:
    """One plan of the table: a stage's experiment on a slice (``unclip plan --config=...``)."""

    stage: str
    experiment: str
    topology: str
    overrides: tuple[str, ...] = ()
    flag = "--config"

    @property
    def name(self) -> str:
        return f"{self.stage}_{self.topology.replace(':', '_')}"

    def argv(self, json_path: str) -> list[str]:
        return [f"{self.flag}={self.experiment}", f"--topology={self.topology}", f"--json={json_path}", *self.overrides]

    @property
    def command(self) -> str:
        return " ".join(["unclip plan", *self.argv("")[:2], *self.overrides])


@dataclasses.dataclass(frozen=True)
class ServingRow(Row):
    """One serving plan: the cascade of the ``experiment`` variant on one chip of a slice (``unclip plan
    --cascade=<variant>``)."""

    flag = "--cascade"

    @property
    def name(self) -> str:
        return f"cascade_{self.experiment}_{self.topology.replace(':', '_')}"


# Every stage's paper experiment on each slice of `unclip_jax.train.defaults.SLICES`, with the settings written
# there (``experiments/<stage>.py:paper@<slice>``): the table checks what the experiment files say.
PLAN_STAGES = ("prior", "ar_prior", "upsampler_1024", "upsampler", "clip", "decoder")
ROWS: tuple[Row, ...] = tuple(
    Row(stage, f"experiments/{stage}.py:paper@{name}", TOPOLOGIES[name]) for name in SLICES for stage in PLAN_STAGES
)


# Serving: the paper's cascade on one chip, four images per call.
SERVING: tuple[ServingRow, ...] = (
    ServingRow("cascade", "paper", "v5p:2x2x1", ("--batch=4",)),
    ServingRow("cascade", "paper", "v5e:2x2", ("--batch=4",)),
)


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_row(row: Row | ServingRow, out_dir: str, force: bool = False, compile: bool = True) -> dict[str, Any]:
    """Plans one row in its own process (unless its JSON exists with the same settings); returns its JSON.

    ``compile=False`` lays the row out only (seconds): the sharded state and the fsdp bound.
    """
    path = os.path.join(out_dir, f"{row.name}.json")
    old = _load(path)
    same = (
        old is not None
        and old.get("overrides") == list(row.overrides)
        and old.get("config", row.experiment) == row.experiment
        and not old.get("error")
    )
    if same and not force and (report.compiled(old) or not compile):
        return old
    if same and not compile:
        return old
    if not compile and isinstance(row, ServingRow):  # a cascade has no layout-only plan
        return old or {}
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "unclip_jax.plan.commands", *row.argv(path), *(() if compile else ("--nocompile",))]
    print(f"[plan] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(proc.stdout, flush=True)
    plan = _load(path) if proc.returncode in (0, 1) else None
    if plan is None:
        last = [ln for ln in proc.stderr.splitlines() if ln.startswith("unclip plan:")] or proc.stderr.splitlines()[-1:]
        plan = {"error": last[-1] if last else f"exit {proc.returncode}", "overrides": list(row.overrides)}
        print(f"[plan] {row.name}: {plan['error']}", flush=True)
    plan.update(stage=row.stage, topology=row.topology, overrides=list(row.overrides), wall_s=time.perf_counter() - t0)
    with open(path, "w") as f:
        json.dump(plan, f, indent=1, default=str)
    return plan


def write_outputs(
    rows: tuple[Row, ...], out_dir: str, markdown: str, serving: tuple[ServingRow, ...] = SERVING
) -> list[dict[str, Any]]:
    """PLAN.md and ``plan.json`` from the rows' JSON files that exist (missing rows are left out)."""
    plans, served = [], []
    for row in (*rows, *serving):
        plan = _load(os.path.join(out_dir, f"{row.name}.json"))
        if plan is not None and (plan.get("error") or report.compiled(plan) or not isinstance(row, ServingRow)):
            entry = {**plan, "stage": row.stage, "topology": row.topology, "command": row.command}
            (served if isinstance(row, ServingRow) else plans).append(entry)
    with open(os.path.join(out_dir, "plan.json"), "w") as f:
        json.dump([*plans, *served], f, indent=1, default=str)
    commands = "\n".join(f"    {p['command']}" for p in (*plans, *served))
    pending = (
        ' Rows marked "not compiled yet" were laid out only (`--nocompile`: the sharded state and the fsdp bound); '
        "`make plan` compiles them."
        if any(not report.compiled(p) for p in plans)
        else ""
    )
    text = (
        "# Scale out: the paper's train steps compiled for TPU slices\n\n"
        f"{report.ESTIMATE_NOTE} Generated by `make plan` (`python -m unclip_jax.plan.table`); every row is one "
        f"`unclip plan` run (below), its full report in `data/plan/`.{pending}\n\n"
        f"{report.markdown_table(plans)}\n\n"
        + (
            f"Serving: the cascade on one chip ({report.CASCADE_NOTE})\n\n{report.markdown_serving(served)}\n\n"
            if served
            else ""
        )
        + f"Commands:\n\n{commands}\n"
    )
    with open(markdown, "w") as f:
        f.write(text)
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.plan.table", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated stages and/or slices to (re)plan")
    parser.add_argument("--force", action="store_true", help="recompile rows whose JSON exists")
    parser.add_argument("--out_dir", default=OUT_DIR)
    parser.add_argument("--markdown", default=MARKDOWN)
    parser.add_argument("--write_only", action="store_true", help="only rewrite PLAN.md / plan.json from the JSONs")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    rows = [row for row in ROWS if not only or row.stage in only or row.topology in only]
    serving = [row for row in SERVING if not only or row.stage in only or row.topology in only]
    if not args.write_only:
        for row in rows:  # every row's layout first (seconds each), then the compiles one at a time
            run_row(row, args.out_dir, compile=False)
        write_outputs(ROWS, args.out_dir, args.markdown)
        for row in (*rows, *serving):
            run_row(row, args.out_dir, args.force)
            write_outputs(ROWS, args.out_dir, args.markdown)
    write_outputs(ROWS, args.out_dir, args.markdown)
    print(f"wrote {args.markdown} and {os.path.join(args.out_dir, 'plan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
