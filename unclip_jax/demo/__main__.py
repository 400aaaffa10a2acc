"""python -m unclip_jax.demo --workdir=workdirs/demo [--profile=full|long] [--fast]

The whole unCLIP pipeline on the built-in captioned-shapes dataset (what ``make demo``
runs): data, CLIP, embeddings, prior, decoder, upsampler (through ``unclip_jax.main`` and
``experiments/*.py``), an attribute classifier, samples, variations, an interpolation,
attribute accuracy / CLIP score / FID, and one HTML report whose path is printed last.
Re-running resumes: finished stages are skipped (``WORKDIR/stages/*.json``) and an
interrupted training stage continues from its checkpoints. ``--profile=long`` trains for hours
(:mod:`unclip_jax.demo.profiles`); ``--fast`` (the ``fast`` profile) runs the ``test``
experiments for a few steps each (a smoke run of every stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_jax.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="everything goes here; re-run with the same one to resume")
    p.add_argument("--fast", action="store_true", help="test experiments, a few steps per stage (smoke run)")
    p.add_argument("--profile", default="full", help="full (make demo, ~20 min), long (hours) or fast")
    args = p.parse_args(argv)

    from unclip_jax.demo import report, runner, stages
    from unclip_jax.demo.profiles import PROFILES

    name = "fast" if args.fast else args.profile
    if name not in PROFILES:
        print(f"--profile={name}: expected one of {sorted(PROFILES)}", file=sys.stderr)
        return 2
    profile = PROFILES[name]
    from unclip_jax.convert.paths import check_output_folder

    try:  # before any stage runs
        check_output_folder(args.workdir, "--workdir")
    except ValueError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    info = os.path.join(args.workdir, "demo.json")
    if os.path.exists(info):
        with open(info) as f:
            before = json.load(f).get("profile")
        if before != profile.name:
            print(
                f"{info}: this work directory holds a '{before}' run; use another --workdir for a '{profile.name}' run",
                file=sys.stderr,
            )
            return 2
    else:
        with open(info, "w") as f:
            json.dump({"profile": profile.name, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    ctx = runner.Context(args.workdir, profile)
    ctx.log(f"profile '{profile.name}' in {ctx.workdir}")
    runner.run_stages(ctx, stages.stages())
    path = report.write_report(ctx.workdir, title=f"unclip_jax demo ({profile.name})")
    ctx.log("report written")
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
