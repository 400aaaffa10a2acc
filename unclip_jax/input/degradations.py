"""Conditioning corruptions for the upsamplers (unCLIP section 2.1 / appendix C).

* Stage 1 (64 -> 256): :func:`blur_degradation`, the high-resolution crop reduced 4x
  (bicubic, antialiased) and then blurred with a 3x3 Gaussian of sigma 0.6, as in
  DALLE2-pytorch's ``LowresConditioner`` (downsample first, then blur).
* Stage 2 (256 -> 1024): :func:`bsr_degradation`, the "light" BSR degradation of
  Zhang et al. 2021 ("Designing a Practical Degradation Model for Deep Blind Image
  Super-Resolution") as used by latent diffusion
  (``ldm/modules/image_degradation/bsrgan_light.py::degradation_bsrgan_variant``):
  an optional 2x pre-downsample, then blur / downsample / Gaussian noise / JPEG in a
  random order (downsample2 always before downsample3), then a final JPEG.

Everything is numpy + PIL + scipy (no OpenCV) and draws all randomness from a
``np.random.Generator``, so the same seed gives the same output. Differences to the
latent-diffusion code: OpenCV's resize modes (linear, cubic, area) are PIL's BILINEAR,
BICUBIC and BOX (PIL antialiases when it downsamples, OpenCV does not); MATLAB-style
``imresize_np`` is PIL BICUBIC; JPEG goes through PIL (4:2:0 subsampling like OpenCV);
``interp2d`` in ``shift_pixel`` is ``scipy.ndimage.map_coordinates`` of order 1.

All functions take and return float32 [H, W, 3] images in [0, 1].
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

_PIL_MODES = (Image.BILINEAR, Image.BICUBIC, Image.BOX)  # cv2 INTER_LINEAR, INTER_CUBIC, INTER_AREA


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> np.ndarray:
    """Normalised 1D Gaussian taps exp(-x^2 / (2 sigma^2)), x = -(k-1)/2 .. (k-1)/2."""
    x = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2.0
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def gaussian_blur(image: np.ndarray, kernel_size: int = 3, sigma: float = 0.6) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (torchvision ``gaussian_blur`` semantics).

    Args:
      image: [H, W, C] float.
      kernel_size: odd number of taps (3 in unCLIP appendix C).
      sigma: standard deviation in pixels (0.6 in unCLIP appendix C).

    Returns:
      [H, W, C] float32, same size.
    """
    k = gaussian_kernel_1d(kernel_size, sigma)
    p = kernel_size // 2
    x = np.pad(np.asarray(image, np.float64), ((p, p), (p, p), (0, 0)), mode="reflect")
    h, w = image.shape[:2]
    x = sum(k[i] * x[i : i + h] for i in range(kernel_size))
    x = sum(k[j] * x[:, j : j + w] for j in range(kernel_size))
    return x.astype(np.float32)


def resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """Float [H, W, C] -> [size[0], size[1], C] with PIL per channel (mode "F"); antialiased."""
    h, w = size
    chans = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F").resize((w, h), resample))
        for c in range(image.shape[-1])
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def blur_degradation(
    image: np.ndarray,
    rng: np.random.Generator | None = None,
    factor: int = 4,
    kernel_size: int = 3,
    sigma: float = 0.6,
) -> np.ndarray:
    """Stage-1 conditioning: bicubic (antialiased) downsample by ``factor``, then Gaussian blur.

    Args:
      image: [H, W, 3] float in [0, 1]; H and W divisible by ``factor``.
      rng: unused (the blur is deterministic); accepted for a uniform interface.

    Returns:
      [H // factor, W // factor, 3] float32 in [0, 1].
    """
    del rng
    h, w = image.shape[:2]
    low = resize(image, (h // factor, w // factor), Image.BICUBIC)
    return np.clip(gaussian_blur(low, kernel_size, sigma), 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# BSR (light), after latent-diffusion bsrgan_light.py


def fspecial_gaussian(hsize: int, sigma: float) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', hsize, sigma)`` (bsrgan_light.fspecial_gaussian)."""
    r = (hsize - 1.0) / 2.0
    x, y = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1))
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(float).eps * h.max()] = 0
    s = h.sum()
    return h / s if s != 0 else h


def anisotropic_gaussian(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """Rotated Gaussian kernel with covariance eigenvalues (l1, l2) (bsrgan_light.anisotropic_Gaussian)."""
    v = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array([1.0, 0.0])
    V = np.array([[v[0], v[1]], [v[1], -v[0]]])
    sigma = V @ np.diag([l1, l2]) @ np.linalg.inv(V)
    center = ksize / 2.0 + 0.5
    y, x = np.mgrid[0:ksize, 0:ksize]
    pts = np.stack([x - center + 1, y - center + 1], -1)
    # multivariate normal pdf up to the constant (normalised below); guard singular covariances
    sigma = sigma + np.eye(2) * 1e-8
    inv = np.linalg.inv(sigma)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", pts, inv, pts))
    return k / k.sum()


def shift_pixel(k: np.ndarray, sf: int) -> np.ndarray:
    """Shifts a kernel by (sf - 1) / 2 pixels to the upper left (bsrgan_light.shift_pixel)."""
    h, w = k.shape
    shift = (sf - 1) * 0.5
    y1 = np.clip(np.arange(h) + shift, 0, h - 1)
    x1 = np.clip(np.arange(w) + shift, 0, w - 1)
    yy, xx = np.meshgrid(y1, x1, indexing="ij")
    return ndimage.map_coordinates(k, [yy, xx], order=1, mode="nearest")


def _convolve(image: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ndimage.convolve(image, k[..., None], mode="mirror")


def _add_blur(image: np.ndarray, rng: np.random.Generator, sf: int) -> np.ndarray:
    wd2 = (4.0 + sf) / 4
    wd = (2.0 + 0.2 * sf) / 4
    if rng.random() < 0.5:
        l1, l2 = wd2 * rng.random(), wd2 * rng.random()
        k = anisotropic_gaussian(int(rng.integers(2, 12)) + 3, rng.random() * np.pi, l1, l2)
    else:
        k = fspecial_gaussian(int(rng.integers(2, 5)) + 3, max(wd * rng.random(), 1e-6))
    return _convolve(image, k)


def _add_gaussian_noise(image: np.ndarray, rng: np.random.Generator, level1: int = 1, level2: int = 2) -> np.ndarray:
    from scipy.linalg import orth

    level = int(rng.integers(level1, level2 + 1))
    r = rng.random()
    if r > 0.6:  # colour noise
        image = image + rng.normal(0, level / 255.0, image.shape).astype(np.float32)
    elif r < 0.4:  # grey noise
        image = image + rng.normal(0, level / 255.0, (*image.shape[:2], 1)).astype(np.float32)
    else:  # correlated across channels
        L = level2 / 255.0
        D = np.diag(rng.random(3))
        U = orth(rng.random((3, 3)))
        cov = np.abs(L**2 * (U.T @ D @ U))
        image = image + rng.multivariate_normal(np.zeros(3), cov, image.shape[:2]).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def _add_jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(80, 96))
    u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) / 255.0


def _random_resize(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return resize(image, (max(1, size[0]), max(1, size[1])), _PIL_MODES[int(rng.integers(3))])


def bsr_degradation(image: np.ndarray, rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    """Light BSR degradation (latent diffusion ``degradation_bsrgan_variant``).

    Args:
      image: [H, W, 3] float in [0, 1]; H and W divisible by ``factor``.
      rng: source of all randomness (same state -> same output).
      factor: total downsampling factor (4 in unCLIP's 256 -> 1024 stage).

    Returns:
      [H // factor, W // factor, 3] float32 in [0, 1] (quantised to 8 bits by the final JPEG).
    """
    jpeg_prob, scale2_prob = 0.9, 0.25
    sf = factor
    h, w = image.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"bsr_degradation: image {h}x{w} must be divisible by factor {factor}")
    out_hw = (h // factor, w // factor)
    x = np.asarray(image, np.float32)
    if sf == 4 and rng.random() < scale2_prob:  # downsample1
        if rng.random() < 0.5:
            x = _random_resize(x, (x.shape[0] // 2, x.shape[1] // 2), rng)
        else:
            x = resize(x, (x.shape[0] // 2, x.shape[1] // 2), Image.BICUBIC)
        x = np.clip(x, 0.0, 1.0)
        sf = 2
    order = list(rng.permutation(7))
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # keep downsample3 last of the two
        order[i2], order[i3] = order[i3], order[i2]
    before_ds2 = x.shape[:2]
    for step in order:
        if step == 0:
            x = _add_blur(x, rng, sf)
        elif step == 2:  # downsample2
            before_ds2 = x.shape[:2]
            if rng.random() < 0.8:
                sf1 = rng.uniform(1, 2 * sf)
                x = _random_resize(x, (int(x.shape[0] / sf1), int(x.shape[1] / sf1)), rng)
            else:
                k = fspecial_gaussian(25, rng.uniform(0.1, 0.6 * sf))
                k = shift_pixel(k, sf)
                x = _convolve(x, k / k.sum())[0::sf, 0::sf]
            x = np.clip(x, 0.0, 1.0)
        elif step == 3:  # downsample3, to the final size
            x = _random_resize(x, (int(before_ds2[0] / sf), int(before_ds2[1] / sf)), rng)
            x = np.clip(x, 0.0, 1.0)
        elif step == 4:
            x = _add_gaussian_noise(x, rng, 1, 2)
        elif step == 5 and rng.random() < jpeg_prob:
            x = _add_jpeg(x, rng)
    x = _add_jpeg(x, rng)
    if x.shape[:2] != out_hw:  # only through rounding of odd intermediate sizes
        x = resize(x, out_hw, Image.BICUBIC)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


DEGRADATIONS = {"blur": blur_degradation, "bsr": bsr_degradation}


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    """Dispatches to :data:`DEGRADATIONS` ("blur" for stage 1, "bsr" for stage 2)."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"degradation {kind!r}: expected one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[kind](image, rng=rng, factor=factor)
