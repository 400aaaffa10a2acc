"""Images in and out of the pipeline: [-1, 1] <-> uint8, PNG files and labelled grids (PIL)."""

from __future__ import annotations

import os
import tempfile
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


def check_image(path: str | os.PathLike) -> None:
    """Raises ValueError naming ``path`` when it is missing, a folder or not an image PIL can decode."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected an image file")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not an image ({e})") from e


def check_output(out: str | os.PathLike) -> None:
    """Raises ValueError when the grid path ``out`` cannot be written: not ``.png``, a folder, or a place where no
    file can be created (checked before any work, so a long sample is never lost at the end)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name such as {out / 'grid.png'}")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the output must be a .png file")
    try:  # the real test (permissions, read-only or full file systems, a file where a folder should be)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.stem}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: the file exists and is not writable")


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
        labels: N strings (wrapped onto up to :data:`LABEL_LINES` lines of the tile width, the last one ending in
            "..." when the caption is longer) or None.
        ncols: columns (default: ``ceil(sqrt(N))``).
        pad: white border in pixels.
        label_height: height of one label line (the strip is as high as the longest wrapped label needs).

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
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_label(str(t), lambda s: measure.textlength(s, font=font), w) for t in labels] if labels else []
    lh = label_height * max((len(x) for x in wrapped), default=0)
    cell_h, cell_w = h + lh + pad, w + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        canvas.paste(Image.fromarray(arr[i]), (x0, y0))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x0, y0 + h + 1 + j * label_height), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


LABEL_LINES = 3


def wrap_label(text: str, width_of, width: float, max_lines: int = LABEL_LINES) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` (``width_of(s)`` measures a string); words
    wider than a line are split; beyond ``max_lines`` the last line is shortened to end in "..."."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if width_of(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while width_of(word) > width and len(word) > 1:  # a word wider than the tile: split it
            k = len(word)
            while k > 1 and width_of(word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and width_of(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


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
