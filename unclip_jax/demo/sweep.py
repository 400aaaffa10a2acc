"""python -m unclip_jax.demo.sweep --workdir=DIR [--n=64] [--only=NAME,...]

Sampling settings of a finished demo run compared without retraining: each variant of :data:`VARIANTS` draws the
validation captions through the run's trained cascade and is scored like the demo's evaluation (attribute accuracy
of the final and the decoder images, background smoothness of both, seconds). Sampling costs seconds to minutes
where a training run costs half an hour, so this is how the profile's ``sample_settings`` are chosen. Prints one
table row per variant and appends it to ``DIR/sweep.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# name -> per-stage StageSettings fields over the profile's sample settings, and "clip_denoised" (the decoder's
# x0 clipping: "default" keeps the trained diffusion's, None disables it).
VARIANTS: dict[str, dict[str, Any]] = {
    "profile": {},
    "dec_g1": {"decoder": dict(guidance_scale=1.0)},
    "dec_g2": {"decoder": dict(guidance_scale=2.0)},
    "dec_g5": {"decoder": dict(guidance_scale=5.0)},
    "dec_50": {"decoder": dict(steps=50)},
    "dec_100": {"decoder": dict(steps=100)},
    "dec_ddpm25": {"decoder": dict(sampler="ddpm", eta=0.0)},
    "dec_ddpm100": {"decoder": dict(sampler="ddpm", eta=0.0, steps=100)},
    "dec_eta1": {"decoder": dict(eta=1.0)},
    "dec_noclip": {"clip_denoised": None},
    "sr_15": {"super_res": dict(steps=15)},
    "sr_ddpm": {"super_res": dict(sampler="ddpm", eta=0.0, steps=25)},
    "prior_g1": {"prior": dict(guidance_scale=1.0)},
    "prior_g8": {"prior": dict(guidance_scale=8.0)},
}


def run_variant(ctx: Any, pipe: Any, name: str, spec: dict[str, Any], val: dict[str, Any], n: int) -> dict[str, Any]:
    """One variant's row: accuracy (final / decoder), background std and ratio (final / decoder), seconds."""
    import numpy as np

    from unclip_jax.demo import attributes, smoothness
    from unclip_jax.demo import stages as demo_stages
    from unclip_jax.pipeline import images as images_lib

    base = demo_stages.sample_settings(ctx)
    settings = dict(base)
    for stage, fields in spec.items():
        if stage != "clip_denoised":
            settings[stage] = dataclasses.replace(settings[stage], **fields)
    captions = val["captions"][:n]
    attrs = {k: v[:n] for k, v in val["attrs"].items()}
    program = pipe.program("generate", settings, decoder_clip_denoised=spec.get("clip_denoised", "default"))
    t = time.perf_counter()
    out = program(pipe.text_inputs(captions), 1)
    seconds = time.perf_counter() - t
    model, variables = attributes.load_classifier(ctx.path("classifier"))
    row: dict[str, Any] = {"variant": name, "spec": {k: v for k, v in spec.items()}, "n": n, "seconds": seconds}
    real = val["images"][:n]
    for key, images in (("final", out["images"]), ("decoder", out["decoder_images"])):
        u8 = images_lib.to_uint8(demo_stages.resize_to(images, attributes.IMAGE_SIZE))
        acc = attributes.score(attributes.predict(model, variables, u8), attrs, captions)
        row[f"{key}_colour"], row[f"{key}_shape"] = acc["colour"]["accuracy"], acc["shape"]["accuracy"]
        sm = smoothness.smoothness({key: u8}, real)
        row[f"{key}_bg_std"], row[f"{key}_bg_ratio"] = sm[key]["mean_std"], sm[key]["ratio"]
    row["real_bg_std"] = float(np.asarray(sm["real"]["mean_std"]))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unclip_jax.demo.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a demo work directory whose sample stage can run")
    p.add_argument("--n", type=int, default=64, help="validation captions per variant")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)

    from unclip_jax.demo import runner
    from unclip_jax.demo import stages as demo_stages
    from unclip_jax.demo.profiles import PROFILES

    with open(os.path.join(args.workdir, "demo.json")) as f:
        profile = PROFILES[json.load(f)["profile"]]
    ctx = runner.Context(args.workdir, profile)
    names = [s for s in args.only.split(",") if s] or list(VARIANTS)
    unknown = [s for s in names if s not in VARIANTS]
    if unknown:
        print(f"--only: unknown variants {unknown}; expected some of {list(VARIANTS)}", file=sys.stderr)
        return 2
    pipe = demo_stages.demo_pipeline(ctx)
    val = demo_stages.read_set(ctx, "val_64")
    for name in names:
        row = run_variant(ctx, pipe, name, VARIANTS[name], val, args.n)
        print(
            f"{name:14s} final colour {row['final_colour']:.3f} shape {row['final_shape']:.3f} bg std "
            f"{row['final_bg_std']:.2f} | decoder colour {row['decoder_colour']:.3f} shape {row['decoder_shape']:.3f} "
            f"bg std {row['decoder_bg_std']:.2f} | {row['seconds']:.0f}s",
            flush=True,
        )
        with open(os.path.join(args.workdir, "sweep.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
