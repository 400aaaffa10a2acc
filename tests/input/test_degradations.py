"""Upsampler conditioning corruptions: closed-form blur, seedable BSR."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unclip_jax.input import degradations, synthetic


def test_blur_equals_the_closed_form_3x3_gaussian():
    """3x3 kernel of exp(-(dx^2+dy^2)/(2*0.6^2)), normalised; reflect padding at the border."""
    rng = np.random.default_rng(0)
    x = rng.random((9, 11, 3))
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.6**2))
    k2 = np.outer(g, g) / np.outer(g, g).sum()
    assert abs(k2[1, 1] - 1 / (1 + 4 * np.exp(-1 / 0.72) + 4 * np.exp(-2 / 0.72))) < 1e-15
    out = degradations.gaussian_blur(x, 3, 0.6)
    ref = np.zeros_like(x)
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="reflect")  # x[-1] = x[1]
    for i in range(9):
        for j in range(11):
            ref[i, j] = np.einsum("ab,abc->c", k2, pad[i : i + 3, j : j + 3])
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # corner by hand: reflect padding mirrors row/col 1 onto -1
    c = sum(k2[a, b] * x[abs(a - 1), abs(b - 1)] for a in range(3) for b in range(3))
    np.testing.assert_allclose(out[0, 0], c, atol=1e-6)


def test_blur_degradation_is_downsample_then_blur():
    img = synthetic.example(0, 0, (64,))["image"].astype(np.float32) / 255
    low = degradations.blur_degradation(img)
    assert low.shape == (16, 16, 3) and low.dtype == np.float32
    down = degradations.resize(img, (16, 16), Image.BICUBIC)
    np.testing.assert_allclose(low, np.clip(degradations.gaussian_blur(down), 0, 1), atol=1e-6)


@pytest.mark.parametrize("size", [64, 128])
def test_bsr_is_seedable_and_downsamples_by_4(size):
    img = synthetic.example(5, 0, (size,))["image"].astype(np.float32) / 255
    outs = [degradations.bsr_degradation(img, np.random.default_rng(s)) for s in (0, 0, 1)]
    for o in outs:
        assert o.shape == (size // 4, size // 4, 3) and o.dtype == np.float32
        assert 0.0 <= o.min() and o.max() <= 1.0
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    # still a degraded version of the image: close to a plain bicubic reduction on average
    plain = degradations.resize(img, (size // 4, size // 4), Image.BICUBIC)
    assert np.abs(outs[0] - plain).mean() < 0.1


def test_bsr_covers_every_branch_over_seeds():
    """Over many seeds the output varies (random order, noise, JPEG, optional pre-downsample)."""
    img = synthetic.example(7, 0, (64,))["image"].astype(np.float32) / 255
    outs = np.stack([degradations.bsr_degradation(img, np.random.default_rng(s)) for s in range(24)])
    assert len({o.tobytes() for o in outs}) == 24
    assert outs.std(0).mean() > 1e-3


def test_kernels_are_normalised_and_shaped():
    k = degradations.anisotropic_gaussian(9, 0.3, 1.5, 0.5)
    assert k.shape == (9, 9) and abs(k.sum() - 1) < 1e-12
    k = degradations.fspecial_gaussian(5, 0.8)
    np.testing.assert_allclose(k, k.T)
    assert abs(k.sum() - 1) < 1e-12
    g = degradations.gaussian_kernel_1d(5, 0.8)
    np.testing.assert_allclose(np.outer(g, g), k, atol=1e-12)


def test_unknown_degradation_is_named():
    with pytest.raises(ValueError, match="blur"):
        degradations.degrade(np.zeros((8, 8, 3), np.float32), "sharpen", np.random.default_rng(0))
