"""Is the background of a generated image as smooth as a real one? Per-pixel spread inside the background region.

The built-in captioned-shapes set (:mod:`unclip_jax.input.synthetic`) draws flat-coloured objects on a flat
background, so the spread of a real image's background pixels is zero up to the antialiased object edges; "grain"
in a generated image shows directly as spread there. The background region is found from the image itself, the
same way for real and generated images (no object geometry is known for a generated one): the background colour
is the per-channel median of the image's border ring (the dataset keeps objects off the outermost pixels), pixels
further than ``threshold`` 8-bit levels from it in some channel are object pixels, and the object pixels grown by
``dilate`` pixels (their antialiased edges) are left out. :func:`ground_truth_mask` gives the region from a real
image's stored scene (centres and sizes) to check the estimate.

:func:`background_std` is the per-image standard deviation of the background pixels (8-bit levels, mean over the
RGB channels); :func:`smoothness` compares generated with real images by the ratio of their means, with the real
value floored at ``floor`` levels (real backgrounds are exactly flat, so an unfloored ratio would be infinite for
any generated noise; one 8-bit level is the smallest spread an image file can carry).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from unclip_jax.input import synthetic

THRESHOLD = 40.0  # 8-bit levels: every dataset colour differs from every background by more in some channel
DILATE = 2  # pixels around an object's pixels left out (antialiased edges, a generated object's soft rim)
RING = 2  # width of the border ring whose median is the background colour
FLOOR = 1.0  # 8-bit levels: the smallest real-image spread a ratio divides by


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of ``[N, H, W]`` by a ``(2r+1)^2`` square (shifted ORs; edges do not wrap)."""
    out = mask.copy()
    h, w = mask.shape[1:]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            src = mask[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            out[:, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] |= src
    return out


def background_colour(images: np.ndarray, ring: int = RING) -> np.ndarray:
    """``[N, 3]``: per-channel median of each image's border ring of width ``ring`` (uint8 ``[N, H, W, 3]``)."""
    x = np.asarray(images, np.float32)
    border = np.ones(x.shape[1:3], bool)
    border[ring:-ring, ring:-ring] = False
    return np.median(x[:, border], axis=1)


def background_mask(
    images: np.ndarray, threshold: float = THRESHOLD, dilate: int = DILATE, ring: int = RING
) -> np.ndarray:
    """``[N, H, W]`` bool, True on background pixels, estimated from uint8 images ``[N, H, W, 3]`` alone."""
    x = np.asarray(images, np.float32)
    bg = background_colour(x, ring)
    objects = np.abs(x - bg[:, None, None, :]).max(-1) > threshold
    return ~_dilate(objects, dilate)


def ground_truth_mask(attrs: Mapping[str, np.ndarray], size: int, dilate: int = DILATE) -> np.ndarray:
    """``[N, size, size]`` bool background of real images from their stored scenes (``attr/center``,
    ``attr/radius``, ``attr/num_objects``): outside each object's circumscribing disc (its radius times
    ``synthetic.CIRCUMSCRIBED``), grown by ``dilate`` pixels.

    Data written before scenes stored their radius (no ``attr/radius``) were all ``standard`` scenes: their radius
    follows from ``attr/size``.
    """
    a = {k.removeprefix("attr/"): np.asarray(v) for k, v in attrs.items()}
    n = len(a["num_objects"].reshape(-1))
    centre = a["center"].reshape(n, 2, 2) * size
    if "radius" in a:
        radius = a["radius"].reshape(n, 2)
    else:
        radius = np.asarray(synthetic.SCENES["standard"].radius)[np.maximum(a["size"].reshape(n, 2), 0)]
    radius = radius * synthetic.CIRCUMSCRIBED * size + dilate + 0.5
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.ones((n, size, size), bool)
    for k in range(2):
        present = (a["num_objects"].reshape(-1) > k)[:, None, None]
        d2 = (xx[None] - centre[:, k, 0, None, None]) ** 2 + (yy[None] - centre[:, k, 1, None, None]) ** 2
        out &= ~(present & (d2 <= radius[:, k, None, None] ** 2))
    return out


def background_std(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[N]``: standard deviation of each image's background pixels (8-bit levels, mean over RGB); NaN for an
    image with fewer than two background pixels."""
    x = np.asarray(images, np.float64)
    out = np.full(len(x), np.nan)
    for i in range(len(x)):
        px = x[i][mask[i]]
        if len(px) >= 2:
            out[i] = float(px.std(axis=0).mean())
    return out


def summary(images: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean / median background std and the mean background fraction of uint8 images ``[N, H, W, 3]``."""
    mask = background_mask(images) if mask is None else mask
    s = background_std(images, mask)
    return {
        "mean_std": float(np.nanmean(s)),
        "median_std": float(np.nanmedian(s)),
        "background_fraction": float(mask.mean()),
        "images": int(len(s)),
    }


def smoothness(
    generated: Mapping[str, np.ndarray], real: np.ndarray, real_attrs: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Background spread of each set of generated uint8 images (``{name: [N, H, W, 3]}``) against real ones.

    Returns ``{"real": summary, "real_ground_truth_mask": summary (with real_attrs), name: summary + "ratio"}``,
    where ratio is the generated mean std over the real one floored at :data:`FLOOR`.
    """
    out: dict[str, Any] = {"real": summary(real), "floor": FLOOR, "threshold": THRESHOLD, "dilate": DILATE}
    if real_attrs is not None:
        out["real_ground_truth_mask"] = summary(real, ground_truth_mask(real_attrs, real.shape[1]))
    ref = max(out["real"]["mean_std"], FLOOR)
    for name, imgs in generated.items():
        s = summary(imgs)
        s["ratio"] = s["mean_std"] / ref
        out[name] = s
    return out
