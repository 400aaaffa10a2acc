"""``unclip plan``: compile an experiment's train step for a TPU slice on this machine and report the fit.

    unclip plan --config=experiments/decoder.py:paper --topology=v5p:4x4x8 [--config.<field>=value ...]
        [--json=OUT.json] [--mfu=0.4] [--cache_dir=DIR] [--nocompile]
    unclip plan --cascade=paper --topology=v5p:2x2x1 [--batch=1] [--stop_after=upsampler_1024] [--json=OUT.json]

The second form plans serving: the sampling cascade of every stage's ``<variant>`` experiment on one chip
(:mod:`unclip_jax.plan.cascade`: memory, seconds per image at the paper's step counts).

Needs libtpu (``pip install -e '.[tpu]'``; ``make install`` does it) and no TPU. Compiles are cached in
``--cache_dir`` (default ``$XDG_CACHE_HOME/unclip_jax/plan_xla``, i.e. ``~/.cache/unclip_jax/plan_xla``), so a
repeated plan of the same program is quick. Exit code 0 when the step fits the chip's HBM with 10% headroom and the
fsdp bound holds, 1 when it compiled but does not, 2 on a usage error (one line on stderr says what to do).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unclip_jax.plan.topology import DoesNotFit, PlanError  # noqa: E402

PROG = "unclip plan"


def make_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh flag set; ml_collections registers the ``--config.<field>`` overrides from ``argv``."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "experiment, e.g. experiments/decoder.py:paper", flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x8 (128 chips), v5e:16x16 (256)", flag_values=fv)
    flags.DEFINE_string("json", None, "also write the plan as JSON here", flag_values=fv)
    flags.DEFINE_float("mfu", 0.4, "model-FLOPs utilisation the days to total_steps are quoted at", flag_values=fv)
    flags.DEFINE_bool(
        "compile", True, "--nocompile: lay out only (bytes from the shardings, fsdp bound)", flag_values=fv
    )
    flags.DEFINE_string("cache_dir", None, "persistent XLA compilation cache (default: see --help)", flag_values=fv)
    flags.DEFINE_string(
        "cascade",
        None,
        "plan the sampling cascade of this experiment variant on one chip (paper, karlo, test)",
        flag_values=fv,
    )
    flags.DEFINE_integer("batch", 1, "--cascade: images per call", flag_values=fv)
    flags.DEFINE_string("stop_after", "upsampler_1024", "--cascade: the last stage that runs", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (argv[0] is the program name), plans, prints; returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + make_flags(argv[:1]).get_help())
        print("  --config.<field>=value: override any field of the experiment's config (mesh, remat, accumulation)")
        return 0
    try:
        fv = make_flags(argv)
        fv(argv)
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError) as e:
        print(f"{PROG}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    if fv.json:  # checked before the compile (minutes at paper size), so the plan is never lost at the end
        from unclip_jax.convert.paths import check_output_file

        try:
            check_output_file(fv.json, "--json")
        except ValueError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
    if fv.cascade and fv.topology:
        return _cascade(fv)
    if fv.config is None or not fv.topology:
        print(f"{PROG}: usage: --config=experiments/<stage>.py:<variant> --topology=v5p:4x4x8 [--json=OUT]",
              file=sys.stderr)  # fmt: skip
        return 2
    from unclip_jax.plan import report, train_step

    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    try:
        with _cache(fv):
            plan = train_step.plan_train(fv.config, fv.topology, mfu=fv.mfu, compile=fv.compile)
    except DoesNotFit as e:
        return _does_not_fit(fv, e, {"config": config_arg})
    except PlanError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    plan["config"] = config_arg
    plan["overrides"] = [a for a in argv if a.startswith("--config.")]
    print(report.format_train(plan))
    _write_json(fv.json, plan)
    return 0 if plan.get("fits", True) and plan["fsdp_check"]["ok"] else 1


def _cache(fv: flags.FlagValues):
    from unclip_jax.train import profiling

    # Every compile, however quick: a plan is one program, compiled again only when something changed. The previous
    # setting comes back afterwards (plans also run inside other programs and the tests).
    return profiling.compilation_cache(fv.cache_dir or profiling.default_cache_dir("plan_xla"), min_compile_time_s=0.0)


def _write_json(path: str | None, plan: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(plan, f, indent=1, default=str)


def _does_not_fit(fv: flags.FlagValues, error: PlanError, fields: dict) -> int:
    """XLA refused the program for the chip's HBM: one line, a JSON that says so (``error``, ``fits`` false), exit 1."""
    print(f"{PROG}: {error}", file=sys.stderr)
    _write_json(fv.json, {**fields, "topology": fv.topology, "fits": False, "error": str(error)})
    return 1


def _cascade(fv: flags.FlagValues) -> int:
    from unclip_jax.plan import cascade, report

    try:
        with _cache(fv):
            plan = cascade.plan_cascade(fv.cascade, fv.topology, batch=fv.batch, mfu=fv.mfu, stop_after=fv.stop_after)
    except DoesNotFit as e:
        return _does_not_fit(fv, e, {"variant": fv.cascade, "batch": fv.batch})
    except PlanError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(report.format_cascade(plan))
    _write_json(fv.json, plan)
    return 0 if plan["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
