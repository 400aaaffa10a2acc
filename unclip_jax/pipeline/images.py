"""Images in and out of the pipeline: [-1, 1] <-> uint8, PNG files and labelled grids (PIL)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[..., H, W, 3]`` floats in [-1, 1] -> uint8 [0, 255] (diffusers: ``x * 0.5 + 0.5``, clamp, round)."""
    x = np.clip(np.asarray(images, np.float32) * 0.5 + 0.5, 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Reads an image file as float32 ``[H, W, 3]`` in [-1, 1]; with ``size``, centre-crops to a square and resizes
    (bicubic) to ``size x size``.

    Raises:
        ValueError: the file is missing or not an image (naming it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
            return from_uint8(np.asarray(im))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read an image ({e})") from e


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Writes one ``[H, W, 3]`` image (uint8, or float in [-1, 1]) as PNG; creates parent folders."""
    from PIL import Image

    arr = image if image.dtype == np.uint8 else to_uint8(image)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def make_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 2,
    label_height: int = 14,
) -> np.ndarray:
    """Tiles images into a grid, each with an optional text label under it.

    Args:
        images: ``[N, H, W, 3]`` (uint8, or float in [-1, 1]); all the same size.
        labels: N strings (truncated to the tile width) or None.
        ncols: columns (default: ``ceil(sqrt(N))``).
        pad: white border in pixels.
        label_height: height of the label strip (when labels are given).

    Returns:
        uint8 ``[H', W', 3]``.
    """
    from PIL import Image, ImageDraw, ImageFont

    arr = np.asarray(images)
    arr = arr if arr.dtype == np.uint8 else to_uint8(arr)
    n, h, w, _ = arr.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"make_grid: {len(labels)} labels for {n} images")
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    lh = label_height if labels else 0
    cell_h, cell_w = h + lh + pad, w + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        canvas.paste(Image.fromarray(arr[i]), (x0, y0))
        if labels:
            text = str(labels[i])
            while text and draw.textlength(text, font=font) > w:
                text = text[:-1]
            draw.text((x0, y0 + h + 1), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_outputs(
    images: np.ndarray,
    out: str | os.PathLike,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    prefix: str = "image",
) -> tuple[Path, list[Path]]:
    """Writes the labelled grid to ``out`` and each image to ``<out stem>_<prefix>_<i>.png`` beside it.

    Returns:
        (grid path, single image paths).
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the output must be a .png file")
    singles = [save_png(img, out.with_name(f"{out.stem}_{prefix}_{i:02d}.png")) for i, img in enumerate(images)]
    grid = save_png(make_grid(images, labels, ncols), out)
    return grid, singles
