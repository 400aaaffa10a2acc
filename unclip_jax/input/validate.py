"""Bad-input handling: decode, check and normalise one (image, caption) pair, or say why not.

Every loader in :mod:`unclip_jax.input` goes through these functions, so a corrupt file is
handled the same way everywhere: the example is skipped, the skip is counted under a
reason in a :class:`SkipReport`, and the counts are logged and written to the manifest at
the end of a job. Nothing here ever raises anything but :class:`BadInput` for bad data,
and nothing silently changes the size of a dataset (the report says by how much it shrank).

Reasons (the keys of ``SkipReport.counts``):

=====================  ==============================================================
``empty_file``         zero-byte image file
``not_an_image``       PIL cannot identify the bytes as an image
``truncated_image``    the header parses but decoding fails (truncated / corrupt data)
``too_small``          shorter side below ``min_size`` (e.g. a 1x1 image)
``decompression_bomb`` width*height above ``max_pixels`` (checked before decoding)
``missing_file``       the caption file names an image that does not exist
``empty_caption``      caption empty or only whitespace
``caption_too_long``   caption longer than ``max_caption_chars`` characters
``caption_not_utf8``   caption bytes are not valid UTF-8
``bad_record``         a caption-file row that cannot be parsed (bad JSON, no field)
=====================  ==============================================================

Image normalisation follows the FID protocol of guided-diffusion
(``guided_diffusion/image_datasets.py::center_crop_arr``, also used by the ADM / GLIDE /
unCLIP MS-COCO evaluations): halve with a box filter while the short side is at least
twice the target, resize the short side to the target with bicubic (PIL, antialiased),
then crop the centre square.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import warnings

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

REASONS = (
    "empty_file",
    "not_an_image",
    "truncated_image",
    "too_small",
    "decompression_bomb",
    "missing_file",
    "empty_caption",
    "caption_too_long",
    "caption_not_utf8",
    "bad_record",
)

# Pillow's own limit (about 89.5 megapixels); a larger image is treated as a bomb.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
DEFAULT_MIN_SIZE = 16
DEFAULT_MAX_CAPTION_CHARS = 1000


class BadInput(Exception):
    """An example that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"BadInput reason {reason!r}: expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class SkipReport:
    """Counts of skipped examples by reason, plus a few example ids per reason."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str = "", detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {detail}" if detail else where)

    def merge(self, other: SkipReport | dict) -> None:
        if isinstance(other, SkipReport):
            other = other.to_dict()
        self.counts.update(other.get("counts", {}))
        for reason, ex in other.get("examples", {}).items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: max(0, self.max_examples - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 examples"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} examples ({parts})"


# ---------------------------------------------------------------------------------------
# captions


def check_caption(raw: str | bytes | None, *, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> str:
    """Returns the stripped caption or raises :class:`BadInput`.

    Args:
      raw: the caption as bytes (decoded strictly as UTF-8) or str. A str holding lone
        surrogates (what ``errors="surrogateescape"`` makes of invalid bytes) counts as
        not UTF-8.
      max_chars: longest caption accepted, in characters (CLIP truncates at 77 tokens
        anyway; this only rejects garbage such as a whole document in a caption field).
    """
    if raw is None:
        raise BadInput("empty_caption", "no caption")
    if isinstance(raw, bytes | bytearray | np.bytes_):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput("caption_not_utf8", str(e)) from None
    if not isinstance(raw, str):
        raise BadInput("bad_record", f"caption is {type(raw).__name__}, expected str")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput("caption_not_utf8", str(e)) from None
    text = " ".join(raw.split())
    if not text:
        raise BadInput("empty_caption")
    if len(text) > max_chars:
        raise BadInput("caption_too_long", f"{len(text)} characters > {max_chars}")
    return text


# ---------------------------------------------------------------------------------------
# images


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3].

    RGBA / LA / P-with-transparency are composited over white; L, P, CMYK, YCbCr, 1 go
    through PIL's conversion; 16-bit (``I;16*``) and 32-bit (``I``, ``F``) greyscale are
    rescaled to 8 bits (PIL's own ``convert`` would clip them at 255).
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "I":
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float: assume [0, 1] if it looks like it, else [0, 255]
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def decode_image(
    data: bytes | None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    where: str = "",
) -> np.ndarray:
    """Decodes image bytes into uint8 [H, W, 3] or raises :class:`BadInput`.

    The decompression-bomb check reads the header only, so a huge image is rejected
    before any pixel memory is allocated.

    Args:
      data: encoded file contents.
      min_size: shorter side must be at least this many pixels.
      max_pixels: width * height must not exceed this.
      where: file name or id, for messages.
    """
    if not data:
        raise BadInput("empty_file", where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # we do the check ourselves, with a reason
        try:
            try:
                img = Image.open(io.BytesIO(data))
            except Exception as e:  # noqa: BLE001  PIL raises many types for garbage
                raise BadInput("not_an_image", f"{where}: {type(e).__name__}: {e}") from None
            w, h = img.size
            if w * h > max_pixels:
                raise BadInput("decompression_bomb", f"{where}: {w}x{h} > {max_pixels} pixels")
            if min(w, h) < min_size:
                raise BadInput("too_small", f"{where}: {w}x{h}, shorter side < {min_size}")
            try:
                img.load()
                arr = to_rgb_array(img)
            except Exception as e:  # noqa: BLE001
                raise BadInput("truncated_image", f"{where}: {type(e).__name__}: {e}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return arr


def center_crop_arr(arr: np.ndarray, image_size: int) -> np.ndarray:
    """Resize the short side to ``image_size`` and crop the centre square (FID protocol).

    Follows guided-diffusion ``image_datasets.center_crop_arr``: BOX-halve while the short
    side is >= 2 * image_size, then bicubic (PIL, antialiased) to the target, centre crop.

    Args:
      arr: uint8 [H, W, 3].
      image_size: output side.

    Returns:
      uint8 [image_size, image_size, 3]; unchanged if already that size.
    """
    if arr.shape[0] == arr.shape[1] == image_size:
        return arr
    img = Image.fromarray(arr)
    while min(*img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(*img.size)
    img = img.resize(tuple(max(image_size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top = (a.shape[0] - image_size) // 2
    left = (a.shape[1] - image_size) // 2
    return np.ascontiguousarray(a[top : top + image_size, left : left + image_size])


def load_example_image(
    data: bytes | np.ndarray | None,
    image_size: int | None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    where: str = "",
) -> np.ndarray:
    """:func:`decode_image` then :func:`center_crop_arr` (if ``image_size`` is given).

    ``data`` may also be an already decoded uint8 [H, W, C] array (C = 1, 3 or 4); it
    gets the same size checks.
    """
    if isinstance(data, np.ndarray) and data.ndim == 3:
        h, w = data.shape[:2]
        if h * w > max_pixels:
            raise BadInput("decompression_bomb", f"{where}: {w}x{h} > {max_pixels} pixels")
        if min(h, w) < min_size:
            raise BadInput("too_small", f"{where}: {w}x{h}, shorter side < {min_size}")
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[data.shape[-1]]
        arr = to_rgb_array(Image.fromarray(np.asarray(data[..., 0] if mode == "L" else data, np.uint8), mode))
        return arr if image_size is None else center_crop_arr(arr, image_size)
    arr = decode_image(data, min_size=min_size, max_pixels=max_pixels, where=where)
    return arr if image_size is None else center_crop_arr(arr, image_size)
