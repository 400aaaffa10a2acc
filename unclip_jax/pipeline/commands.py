"""The sampling commands of the ``unclip`` CLI: ``sample``, ``vary``, ``interpolate``, ``textdiff``.

    unclip sample --model DIR --prompt "a red cube" --num 4 --out grid.png
    unclip vary IMAGE --model DIR --num 4 --eta 1.0 --out vary.png
    unclip interpolate A B --model DIR --num 5 --out interp.png
    unclip textdiff IMAGE --model DIR --from "a photo of a cat" --to "a photo of a dog" --out diff.png

Every command takes a model directory (``--model``: a diffusers Karlo-layout pipeline folder or a folder of native
components) and/or per-component paths (``--prior WORKDIR`` etc.: training workdirs, native or diffusers folders),
per-stage sampling settings (``--<stage>-steps``, ``--<stage>-sampler``, ``--<stage>-eta``, ``--<stage>-guidance``),
writes every image as a PNG plus a labelled grid (``--out``), prints where, and prints a line per finished stage.

The prior may be the diffusion prior or the autoregressive prior (paper section 2.2; ``experiments/ar_prior.py``):
``--prior PATH`` takes either, the kind is read from the folder (its module class). ``--prior-kind {auto,diffusion,ar}``
asserts it; ``--prior ar`` (or ``--prior=ar``; ``diffusion`` likewise), when no file of that name exists, is short for
``--prior-kind ar`` with the prior taken from ``--model`` (``MODEL/ar_prior`` if present, else ``MODEL/prior``). The
AR prior's sampling: ``--prior-guidance`` (on the logits), ``--prior-temperature``, ``--prior-top-k``,
``--prior-top-p`` (code tokens); it ignores ``--prior-steps/-sampler/-eta``.

``unclip_jax.cli`` dispatches ``unclip sample ...`` to :func:`main` (``["sample", ...]``);
``python -m unclip_jax.pipeline.commands sample ...`` runs them without the top-level CLI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Stage name -> (flag prefix, default steps, default sampler, default guidance).
_STAGE_FLAGS = {
    "prior": "prior",
    "decoder": "decoder",
    "super_res": "super-res",
    "upsampler_1024": "upsampler-1024",
}
_COMPONENT_FLAGS = {
    "prior": "prior",
    "decoder": "decoder",
    "super_res_first": "super-res",
    "super_res_last": "super-res-last",
    "upsampler_1024": "upsampler-1024",
    "text_encoder": "text-encoder",
    "image_encoder": "image-encoder",
}


def _steps(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _float_list(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from e


def _add_common(parser: argparse.ArgumentParser, guided: tuple[str, ...], default_out: str) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=Path, default=None, help="pipeline folder (diffusers Karlo layout or native)")
    for comp, flag in _COMPONENT_FLAGS.items():
        g.add_argument(
            f"--{flag}",
            dest=f"path_{comp}",
            type=Path,
            default=None,
            help=f"{comp}: training workdir (export/ema), native or diffusers folder (overrides --model)"
            + (
                "; a diffusion (PriorTransformer) or autoregressive (ARPrior, native/workdir only) prior, detected "
                "from the folder; 'ar' / 'diffusion' (no such file) = --prior-kind ar / diffusion"
                if comp == "prior"
                else ""
            ),
        )
    if "prior" in guided:
        g.add_argument(
            "--prior-kind",
            dest="prior_kind",
            choices=("auto", "diffusion", "ar"),
            default="auto",
            help="which prior to use: auto (whatever the prior folder holds), diffusion or ar (autoregressive; "
            "without --prior PATH it is looked up in MODEL/ar_prior, then MODEL/prior). '--prior ar' is short for "
            "'--prior-kind ar'",
        )
    s = parser.add_argument_group("sampling (per stage; defaults: Karlo's)")
    for stage, flag in _STAGE_FLAGS.items():
        note = " (diffusion prior only)" if stage == "prior" else ""
        s.add_argument(f"--{flag}-steps", dest=f"{stage}_steps", type=_steps, default=None, help=f"{stage} steps{note}")
        s.add_argument(f"--{flag}-sampler", dest=f"{stage}_sampler", choices=("ddpm", "ddim"), default=None)
        s.add_argument(f"--{flag}-eta", dest=f"{stage}_eta", type=float, default=None, help=f"DDIM eta{note}")
        if stage in guided:
            s.add_argument(
                f"--{flag}-guidance",
                dest=f"{stage}_guidance",
                type=float,
                default=None,
                help="classifier-free guidance scale (<= 0: unguided)",
            )
    if "prior" in guided:
        s.add_argument(
            "--prior-temperature",
            dest="prior_temperature",
            type=float,
            default=None,
            help="AR prior only: softmax temperature of the code tokens (default 1)",
        )
        s.add_argument(
            "--prior-top-k",
            dest="prior_top_k",
            type=int,
            default=None,
            help="AR prior only: keep the k most likely code tokens (default 0: off)",
        )
        s.add_argument(
            "--prior-top-p",
            dest="prior_top_p",
            type=float,
            default=None,
            help="AR prior only: nucleus sampling of the code tokens, in (0, 1] (default 1: off)",
        )
    s.add_argument(
        "--stop-after",
        choices=("decoder", "super_res", "upsampler_1024"),
        default=None,
        help="last stage to run (default: the last upsampler loaded)",
    )
    s.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(default_out), help="grid PNG; singles are written beside it")


def _stage_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    from unclip_jax.pipeline.cascade import StageSettings

    out = {}
    for stage, base in defaults.items():
        steps = getattr(args, f"{stage}_steps", None)
        sampler = getattr(args, f"{stage}_sampler", None)
        eta = getattr(args, f"{stage}_eta", None)
        guidance = getattr(args, f"{stage}_guidance", None)
        kw = {}
        for name in ("temperature", "top_k", "top_p"):  # the AR prior's (only the prior has these flags)
            value = getattr(args, f"{stage}_{name}", None)
            if value is not None:
                kw[name] = value
        if steps is not None:
            kw["steps"] = steps
        if sampler is not None:
            kw["sampler"] = sampler
        if eta is not None:
            kw["eta"] = eta
            if eta and kw.get("sampler", base.sampler) == "ddpm":
                kw["sampler"] = "ddim"
        if guidance is not None:
            kw["guidance_scale"] = guidance if guidance > 0 else None
        out[stage] = StageSettings(**{**base.__dict__, **kw})
    return out


def _resolve_prior_kind(args: argparse.Namespace) -> str:
    """``--prior ar`` / ``--prior diffusion`` (no such file or folder) is ``--prior-kind``; returns the kind and clears
    ``args.path_prior`` in that case (so that later readers of the paths see no prior path)."""
    kind = getattr(args, "prior_kind", "auto") or "auto"
    path = getattr(args, "path_prior", None)
    if path is not None and str(path) in ("ar", "diffusion") and not Path(path).exists():
        if kind not in ("auto", str(path)):
            raise SystemExit(f"unclip: --prior {path} contradicts --prior-kind {kind}")
        kind, args.path_prior = str(path), None
    args.prior_kind = kind
    return kind


def _load(args: argparse.Namespace, require: tuple[str, ...]):
    from unclip_jax.pipeline.loading import PipelineLoadError, load_pipeline

    kind = _resolve_prior_kind(args)
    paths = {comp: getattr(args, f"path_{comp}", None) for comp in _COMPONENT_FLAGS}
    if args.model is None and not any(paths.values()):
        raise SystemExit("unclip: give --model DIR or component paths (--prior, --decoder, ...)")
    require = require + (() if args.stop_after == "decoder" else ("super_res_first",))
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(args.model, paths=paths, require=require, prior_kind=kind)
    except PipelineLoadError as e:  # names the component and the folders searched
        raise SystemExit(f"unclip: {e}") from e
    loaded = [k for k, v in pipe.components.items() if v is not None]
    kind_note = f" (prior: {pipe.prior_kind})" if pipe.prior_kind else ""
    print(f"[unclip] loaded {', '.join(loaded)}{kind_note} in {time.perf_counter() - t0:.1f}s", flush=True)
    return pipe


def _write(result: dict[str, Any], out: Path, labels: list[str], ncols: int | None = None) -> None:
    from unclip_jax.pipeline.images import save_outputs

    grid, singles = save_outputs(result["images"], out, labels, ncols=ncols)
    for p in singles:
        print(f"[unclip] wrote {p}")
    print(f"[unclip] wrote grid {grid} ({len(singles)} images, {result['images'].shape[1]}px)", flush=True)


def _timed(what: str, fn, *a, **kw):
    print(f"[unclip] {what}: compiling and running (stages report as they finish)", flush=True)
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    print(f"[unclip] {what}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- sample
def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip sample``: text -> images through the whole cascade."""
    parser.add_argument("--prompt", action="append", required=True, help="caption (repeat for a batch)")
    parser.add_argument("--num", type=int, default=1, help="images per prompt")
    parser.add_argument("--candidates", type=int, default=2, help="prior samples per image; largest z_i.z_t kept")
    parser.add_argument(
        "--image-embeds",
        choices=("prior", "text", "zero", "learned"),
        default="prior",
        help="decoder z_i: prior sample, the CLIP text embedding (zero-shot), zeros or the learned CFG embedding",
    )
    _add_common(parser, guided=("prior", "decoder"), default_out="samples/grid.png")


def run_sample(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline.cascade import DEFAULT_SETTINGS

    require = ("text_encoder", "decoder") + (("prior",) if args.image_embeds == "prior" else ())
    pipe = _load(args, require)
    settings = _stage_settings(args, DEFAULT_SETTINGS)
    out = _timed(
        "sample",
        pipe,
        args.prompt,
        seed=args.seed,
        num_images_per_prompt=args.num,
        settings=settings,
        num_candidates=args.candidates,
        image_embed_source=args.image_embeds,
        stop_after=args.stop_after,
        progress=True,
    )
    labels = [p for p in args.prompt for _ in range(args.num)]
    _write(out, args.out, labels, ncols=args.num if len(args.prompt) > 1 else None)
    return 0


# ----------------------------------------------------------------------------------------------------- manipulations
def _manip_defaults() -> dict[str, Any]:
    from unclip_jax.pipeline.cascade import DEFAULT_SETTINGS
    from unclip_jax.pipeline.manipulations import MANIPULATION_DECODER

    return {**DEFAULT_SETTINGS, "decoder": MANIPULATION_DECODER}


def _image_size(pipe) -> int:
    return max(pipe.decoder_size, 224)


def add_vary_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip vary IMAGE``: variations by DDIM inversion + decoding with eta > 0 (paper section 3.1)."""
    parser.add_argument("image", type=Path, help="input image")
    parser.add_argument("--num", type=int, default=4, help="number of variations")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta of decoding (0 reconstructs)")
    parser.add_argument("--caption", default="", help="caption conditioning of the decoder (default: none)")
    _add_common(parser, guided=("decoder",), default_out="samples/vary.png")


def run_vary(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = _load(args, ("text_encoder", "decoder", "image_encoder"))
    img = images.load_image(args.image, _image_size(pipe))
    out = _timed(
        "vary",
        manipulations.variations,
        pipe,
        img,
        num=args.num,
        eta=args.eta,
        seed=args.seed,
        caption=args.caption,
        settings=_stage_settings(args, _manip_defaults()),
        stop_after=args.stop_after,
        progress=True,
    )
    _write(out, args.out, out["labels"])
    return 0


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip interpolate A B``: slerp of the CLIP image embeddings (paper section 3.2)."""
    parser.add_argument("image_a", type=Path)
    parser.add_argument("image_b", type=Path)
    parser.add_argument("--num", type=int, default=5, help="number of interpolation points (endpoints included)")
    parser.add_argument(
        "--x-T", dest="x_T", choices=("slerp", "fixed"), default="slerp", help="decoder latent: slerped or fixed"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta of decoding")
    _add_common(parser, guided=("decoder",), default_out="samples/interpolate.png")


def run_interpolate(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = _load(args, ("text_encoder", "decoder", "image_encoder"))
    size = _image_size(pipe)
    out = _timed(
        "interpolate",
        manipulations.interpolate,
        pipe,
        images.load_image(args.image_a, size),
        images.load_image(args.image_b, size),
        num=args.num,
        x_T_mode=args.x_T,
        eta=args.eta,
        seed=args.seed,
        settings=_stage_settings(args, _manip_defaults()),
        stop_after=args.stop_after,
        progress=True,
    )
    _write(out, args.out, out["labels"], ncols=args.num)
    return 0


def add_textdiff_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip textdiff IMAGE --from SRC --to DST``: rotate z_i towards a text diff (paper section 3.3)."""
    parser.add_argument("image", type=Path)
    parser.add_argument("--from", dest="source", default="a photo", help="caption of the current image")
    parser.add_argument("--to", dest="target", required=True, help="caption of the edit")
    parser.add_argument(
        "--thetas", type=_float_list, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], help="comma-separated slerp amounts"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta of decoding")
    _add_common(parser, guided=("decoder",), default_out="samples/textdiff.png")


def run_textdiff(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = _load(args, ("text_encoder", "decoder", "image_encoder"))
    out = _timed(
        "textdiff",
        manipulations.text_diff,
        pipe,
        images.load_image(args.image, _image_size(pipe)),
        args.source,
        args.target,
        thetas=args.thetas,
        eta=args.eta,
        seed=args.seed,
        settings=_stage_settings(args, _manip_defaults()),
        stop_after=args.stop_after,
        progress=True,
    )
    _write(out, args.out, out["labels"], ncols=len(args.thetas))
    return 0


COMMANDS = {
    "sample": (add_sample_arguments, run_sample, "text -> images (prior, decoder, upsamplers)"),
    "vary": (add_vary_arguments, run_vary, "variations of an image (DDIM inversion, eta > 0)"),
    "interpolate": (add_interpolate_arguments, run_interpolate, "interpolate between two images"),
    "textdiff": (add_textdiff_arguments, run_textdiff, "edit an image along a text diff"),
}


def main(argv: list[str] | None = None) -> int:
    """``python -m unclip_jax.pipeline.commands COMMAND ...`` (same as ``unclip COMMAND ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m unclip_jax.pipeline.commands {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    add, run, help_text = COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"unclip {argv[0]}", description=help_text)
    add(parser)
    return int(run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
