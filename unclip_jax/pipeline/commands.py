"""The sampling commands of the ``unclip`` CLI: ``sample``, ``vary``, ``interpolate``, ``textdiff``.

    unclip sample --model DIR --prompt "a red cube" --num 4 --out grid.png
    unclip vary IMAGE --model DIR --num 4 --eta 1.0 --out vary.png
    unclip interpolate A B --model DIR --num 5 --out interp.png
    unclip textdiff IMAGE --model DIR --from "a photo of a cat" --to "a photo of a dog" --out diff.png

Every command takes a model directory (``--model``: a diffusers Karlo-layout pipeline folder or a folder of native
components) and/or per-component paths (``--prior WORKDIR`` etc.: training workdirs, native or diffusers folders),
per-stage sampling settings (``--<stage>-steps``, ``--<stage>-sampler``, ``--<stage>-eta``, ``--<stage>-guidance``),
writes every image as a PNG plus a labelled grid (``--out``), prints where, and prints a line per finished stage.

Bad input is found before any model is loaded: a count below its minimum (``--num``), an input image that is missing
or not an image, an ``--out`` that is a folder, not a ``.png`` or not writable. A stage whose output holds NaN/inf
(damaged weights) is an error naming it, never a black PNG (:func:`check_stage_outputs`).

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

from unclip_jax.pipeline.flags import add_pipeline_arguments, float_list, load_from_args, stage_settings
from unclip_jax.pipeline.plan import IMAGE_EMBED_SOURCES

# Program outputs of each stage (unclip_jax.pipeline.program.run_cascade), in cascade order.
STAGE_OUTPUTS = (
    ("x_T", "decoder (DDIM inversion)"),
    ("image_embeds", "prior"),
    ("decoder_images", "decoder"),
    ("super_res_images", "super_res"),
    ("upsampler_1024_images", "upsampler_1024"),
    ("images", "the last stage"),
)


def check_stage_outputs(result: dict[str, Any]) -> None:
    """Refuses a result whose stage outputs hold NaN/inf, naming the first such stage.

    Raises:
      FloatingPointError: ``<stage> produced N non-finite values ...``.
    """
    for key, stage in STAGE_OUTPUTS:
        if key not in result:
            continue
        x = np.asarray(result[key])
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise FloatingPointError(
                f"the {stage} stage produced {bad} non-finite values of {x.size} ({key}); its weights or settings "
                "are broken (no images written)"
            )


def _write(result: dict[str, Any], out: Path, labels: list[str], ncols: int | None = None) -> None:
    from unclip_jax.pipeline.images import save_outputs

    check_stage_outputs(result)

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
def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse reports anything else as a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip sample``: text -> images through the whole cascade."""
    parser.add_argument("--prompt", action="append", required=True, help="caption (repeat for a batch)")
    parser.add_argument("--num", type=at_least(1), default=1, help="images per prompt")
    parser.add_argument(
        "--candidates", type=at_least(1), default=2, help="prior samples per image; largest z_i.z_t kept"
    )
    parser.add_argument(
        "--image-embeds",
        choices=IMAGE_EMBED_SOURCES,
        default="prior",
        help="decoder z_i: prior sample, the CLIP text embedding (zero-shot), zeros or the learned CFG embedding",
    )
    add_pipeline_arguments(parser, guided=("prior", "decoder"), default_out="samples/grid.png")


def run_sample(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline.settings import DEFAULT_SETTINGS

    require = ("text_encoder", "decoder") + (("prior",) if args.image_embeds == "prior" else ())
    pipe = load_from_args(args, require)
    settings = stage_settings(args, DEFAULT_SETTINGS)
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
def _manipulation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What every manipulation command passes: DDIM eta, seed, the stage settings over the manipulations' defaults
    (the decoder: `MANIPULATION_DECODER`), the last stage, progress lines."""
    from unclip_jax.pipeline.manipulations import MANIPULATION_DECODER
    from unclip_jax.pipeline.settings import DEFAULT_SETTINGS

    defaults = {**DEFAULT_SETTINGS, "decoder": MANIPULATION_DECODER}
    settings = stage_settings(args, defaults)
    return dict(eta=args.eta, seed=args.seed, settings=settings, stop_after=args.stop_after, progress=True)


def _image_size(pipe) -> int:
    return max(pipe.decoder_size, 224)


def add_vary_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip vary IMAGE``: variations by DDIM inversion + decoding with eta > 0 (paper section 3.1)."""
    parser.add_argument("image", type=Path, help="input image")
    parser.add_argument("--num", type=at_least(1), default=4, help="number of variations")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta of decoding (0 reconstructs)")
    parser.add_argument("--caption", default="", help="caption conditioning of the decoder (default: none)")
    add_pipeline_arguments(parser, guided=("decoder",), default_out="samples/vary.png")


def run_vary(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = load_from_args(args, ("text_encoder", "decoder", "image_encoder"))
    img = images.load_image(args.image, _image_size(pipe))
    out = _timed(
        "vary",
        manipulations.variations,
        pipe,
        img,
        num=args.num,
        caption=args.caption,
        **_manipulation_kwargs(args),
    )
    _write(out, args.out, out["labels"])
    return 0


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip interpolate A B``: slerp of the CLIP image embeddings (paper section 3.2)."""
    parser.add_argument("image_a", type=Path)
    parser.add_argument("image_b", type=Path)
    parser.add_argument(
        "--num", type=at_least(2), default=5, help="number of interpolation points (endpoints included)"
    )
    parser.add_argument(
        "--x-T", dest="x_T", choices=("slerp", "fixed"), default="slerp", help="decoder latent: slerped or fixed"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta of decoding")
    add_pipeline_arguments(parser, guided=("decoder",), default_out="samples/interpolate.png")


def run_interpolate(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = load_from_args(args, ("text_encoder", "decoder", "image_encoder"))
    size = _image_size(pipe)
    out = _timed(
        "interpolate",
        manipulations.interpolate,
        pipe,
        images.load_image(args.image_a, size),
        images.load_image(args.image_b, size),
        num=args.num,
        x_T_mode=args.x_T,
        **_manipulation_kwargs(args),
    )
    _write(out, args.out, out["labels"], ncols=args.num)
    return 0


def add_textdiff_arguments(parser: argparse.ArgumentParser) -> None:
    """``unclip textdiff IMAGE --from SRC --to DST``: rotate z_i towards a text diff (paper section 3.3)."""
    parser.add_argument("image", type=Path)
    parser.add_argument("--from", dest="source", default="a photo", help="caption of the current image")
    parser.add_argument("--to", dest="target", required=True, help="caption of the edit")
    parser.add_argument(
        "--thetas", type=float_list, default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], help="comma-separated slerp amounts"
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta of decoding")
    add_pipeline_arguments(parser, guided=("decoder",), default_out="samples/textdiff.png")


def run_textdiff(args: argparse.Namespace) -> int:
    from unclip_jax.pipeline import images, manipulations

    pipe = load_from_args(args, ("text_encoder", "decoder", "image_encoder"))
    out = _timed(
        "textdiff",
        manipulations.text_diff,
        pipe,
        images.load_image(args.image, _image_size(pipe)),
        args.source,
        args.target,
        thetas=args.thetas,
        **_manipulation_kwargs(args),
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
    args = parser.parse_args(argv[1:])
    check_inputs(args)
    return int(run(args) or 0)


def check_inputs(args: argparse.Namespace) -> None:
    """What can be checked before any model is loaded: input images readable, ``--out`` writable.

    Raises:
      ValueError: naming the argument and the file.
    """
    from unclip_jax.pipeline import images

    for name in ("image", "image_a", "image_b"):
        if getattr(args, name, None) is not None:
            images.check_image(getattr(args, name))
    if getattr(args, "out", None) is not None:
        images.check_output(args.out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
