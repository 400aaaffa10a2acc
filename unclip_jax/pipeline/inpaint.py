"""Text-guided inpainting through the cascade: ``unclip inpaint`` and the checks of its inputs.

    unclip inpaint IMAGE --mask MASK.png --prompt "a red circle" --model DIR --out OUT.png

The mask is an image of the source's size: white (>= 0.5 after scaling to [0, 1], :data:`MASK_THRESHOLD`) keeps the
source pixel, black is inpainted; colour masks are read as grey. The prompt goes through the prior (z_i) and the
decoder; the decoder inpaints with RePaint resampling (``--method repaint``, any decoder; Lugmayr et al. 2022,
`unclip_jax.diffusion.repaint`) or with GLIDE's inpainting decoder (``--method model``, ``experiments/
decoder_inpaint.py``), and the upsamplers inpaint with RePaint, so the output equals the source on every kept pixel.
The source is centre-cropped to a square and resized to the last stage's size (the mask likewise, with nearest
neighbours, after the size check). ``--jump-length`` / ``--jump-n-sample`` set RePaint's resampling (10 / 10).

Writes ``OUT`` (the inpainted image at the last stage's size) and ``OUT`` with ``_grid`` (source with the masked
region greyed, result) beside it. Bad input is a one-line error before any model is loaded: a missing or unreadable
image or mask, a mask whose size differs from the image's, an ``--out`` that is not a writable ``.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from unclip_jax.diffusion.repaint import MASK_THRESHOLD
from unclip_jax.pipeline.flags import add_pipeline_arguments, load_from_args, stage_settings
from unclip_jax.pipeline.plan import INPAINT_METHODS


def prepare_inpaint_inputs(image, mask, num_prompts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Checks and shapes an inpainting source and mask for the program.

    Args:
        image: ``[H, W, 3]`` or ``[B, H, W, 3]`` in [-1, 1], square.
        mask: ``[H, W]``, ``[H, W, 1]`` or ``[B, H, W, 1]`` in [0, 1] (1 = keep).
        num_prompts: a single image is repeated for that many prompts.

    Returns:
        image ``[B, S, S, 3]`` float32 and mask ``[B, S, S, 1]`` float32 in {0, 1} (thresholded at
        :data:`MASK_THRESHOLD`).

    Raises:
        ValueError: one line naming the problem (shapes, sizes, values outside [0, 1]).
    """
    image, mask = np.asarray(image, np.float32), np.asarray(mask, np.float32)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"inpaint: image of shape {image.shape}: expected a square [H, W, 3] or [B, H, W, 3]")
    if mask.ndim == 2:
        mask = mask[..., None]
    if mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[-1] != 1:
        raise ValueError(f"inpaint: mask of shape {mask.shape}: expected [H, W], [H, W, 1] or [B, H, W, 1]")
    if mask.shape[1:3] != image.shape[1:3]:
        raise ValueError(
            f"inpaint: the mask is {mask.shape[2]}x{mask.shape[1]} but the image is {image.shape[2]}x{image.shape[1]}"
        )
    if not np.all(np.isfinite(mask)) or mask.min() < 0.0 or mask.max() > 1.0:
        raise ValueError(f"inpaint: mask values in [{mask.min()}, {mask.max()}]: expected [0, 1] (1 = keep)")
    b = max(image.shape[0], mask.shape[0], num_prompts if image.shape[0] == 1 else 1)
    image = np.broadcast_to(image, (b, *image.shape[1:])).copy()
    mask = np.broadcast_to(mask, (b, *mask.shape[1:]))
    mask = (mask >= MASK_THRESHOLD).astype(np.float32)
    if num_prompts not in (1, b):
        raise ValueError(f"inpaint: {num_prompts} prompts for {b} images")
    return image, mask


def load_mask(path: str | Path) -> np.ndarray:
    """A mask image as float32 ``[H, W]`` in [0, 1] (grey level / 255; 1 = keep)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read a mask image ({e})") from e


def _square(x: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top : top + s, left : left + s]


def _resize(x: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    if x.shape[0] == size:
        return x
    if nearest:
        idx = (np.arange(size) * x.shape[0] / size).astype(int)
        return x[idx][:, idx]
    u8 = np.round(np.clip(x * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    im = Image.fromarray(u8).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, np.float32) / 127.5 - 1.0


def output_size(pipe, stop_after: str | None) -> int:
    """The side of the cascade's output: the size of ``stop_after`` or of the last loaded stage."""
    sizes = {"decoder": pipe.decoder_size}
    for stage, comp in (("super_res", "super_res_first"), ("upsampler_1024", "upsampler_1024")):
        if pipe.components.get(comp) is not None:
            sizes[stage] = int(pipe.component(comp).module.sample_size)
    return sizes[stop_after] if stop_after in sizes else sizes[list(sizes)[-1]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unclip inpaint", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="source image")
    parser.add_argument("--mask", type=Path, required=True, help="mask image of the source's size: white keeps")
    parser.add_argument("--prompt", required=True, help="caption of the inpainted content")
    parser.add_argument("--method", choices=INPAINT_METHODS, default="repaint", help="decoder inpainting method")
    parser.add_argument("--jump-length", type=int, default=10, help="RePaint: steps per resampling jump")
    parser.add_argument("--jump-n-sample", type=int, default=10, help="RePaint: passes per jump point")
    parser.add_argument("--candidates", type=int, default=2, help="prior samples; largest z_i.z_t kept")
    add_pipeline_arguments(parser, guided=("prior", "decoder"), default_out="samples/inpaint.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``unclip inpaint IMAGE --mask MASK --prompt TEXT [model flags] --out OUT.png`` (argv[0] is the program name)."""
    from unclip_jax.pipeline import images
    from unclip_jax.pipeline.settings import DEFAULT_SETTINGS

    argv = list(sys.argv if argv is None else argv)
    args = build_parser().parse_args(argv[1:])
    images.check_image(args.image)
    images.check_image(args.mask)
    images.check_output(args.out)
    mask = load_mask(args.mask)
    source = images.load_image(args.image)
    if mask.shape != source.shape[:2]:
        raise ValueError(
            f"{args.mask}: the mask is {mask.shape[1]}x{mask.shape[0]} but {args.image} is "
            f"{source.shape[1]}x{source.shape[0]}"
        )
    if args.jump_length < 1 or args.jump_n_sample < 1 or args.candidates < 1:
        raise ValueError("--jump-length, --jump-n-sample and --candidates must be >= 1")
    pipe = load_from_args(args, ("text_encoder", "decoder", "prior"))
    stop = args.stop_after
    size = output_size(pipe, stop)
    source = _resize(_square(source), size, nearest=False)
    mask = _resize(_square(mask), size, nearest=True)
    print(f"[unclip] inpaint: {args.method} at {size}x{size}, {int((mask < MASK_THRESHOLD).sum())} pixels to fill")
    t0 = time.perf_counter()
    out = pipe.inpaint(
        source,
        mask,
        args.prompt,
        method=args.method,
        jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample,
        seed=args.seed,
        settings=stage_settings(args, DEFAULT_SETTINGS),
        num_candidates=args.candidates,
        stop_after=stop,
        progress=True,
    )
    print(f"[unclip] inpaint: done in {time.perf_counter() - t0:.1f}s", flush=True)
    result = out["images"][0]
    if not np.all(np.isfinite(result)):
        raise FloatingPointError("inpaint: the cascade produced non-finite values (no image written)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images.save_png(result, args.out)
    shown = np.where(out["mask"][0] >= MASK_THRESHOLD, out["source"][0], 0.0)
    grid = args.out.with_name(args.out.stem + "_grid.png")
    images.save_png(np.concatenate([shown, result], axis=1), grid)
    print(f"[unclip] wrote {args.out} and {grid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
