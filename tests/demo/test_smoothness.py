"""Background smoothness: exact on flat real images, recovers added noise, and the mask estimate matches the scene."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.demo import smoothness
from unclip_jax.input import synthetic


@pytest.fixture(scope="module")
def real():
    d = synthetic.generate(24, seed=5, sizes=(64,), canvas=256)
    return d["images"][64], d["attributes"]


def test_dilate_is_a_square_and_does_not_wrap():
    m = np.zeros((1, 6, 6), bool)
    m[0, 2, 3] = True
    m[0, 0, 0] = True
    out = smoothness._dilate(m, 1)
    want = np.zeros((6, 6), bool)
    want[1:4, 2:5] = True
    want[0:2, 0:2] = True
    np.testing.assert_array_equal(out[0], want)


def test_real_backgrounds_are_flat_and_the_estimated_region_lies_in_the_true_one(real):
    images, attrs = real
    s = smoothness.summary(images)
    assert s["mean_std"] == 0.0 and s["images"] == 24
    est = smoothness.background_mask(images)
    gt = smoothness.ground_truth_mask(attrs, 64)
    assert 0.6 < est.mean() < 0.95
    colours = np.asarray([synthetic.BACKGROUNDS[synthetic.BACKGROUND_NAMES[b]] for b in attrs["background"]])
    # what the estimate calls background is background, and it misses little of the shapes' outer region
    assert (images[est] == np.repeat(colours, est.reshape(24, -1).sum(1), axis=0)).all()
    assert (gt & ~est).sum() <= 0.05 * gt.sum()
    np.testing.assert_array_equal(smoothness.background_colour(images), colours)


@pytest.mark.parametrize("scenes", ["standard", "large"])
def test_ground_truth_mask_follows_the_stored_radius(scenes):
    """The true background holds only background pixels for either scene distribution; data without
    ``attr/radius`` (written before it was stored; all ``standard``) get the same mask from ``attr/size``."""
    d = synthetic.generate(24, seed=6, sizes=(64,), canvas=256, scenes=scenes)
    images, attrs = d["images"][64], d["attributes"]
    gt = smoothness.ground_truth_mask(attrs, 64, dilate=1)
    colours = np.asarray([synthetic.BACKGROUNDS[synthetic.BACKGROUND_NAMES[b]] for b in attrs["background"]])
    assert (images[gt] == np.repeat(colours, gt.reshape(24, -1).sum(1), axis=0)).all()
    assert 0.4 < gt.mean() < 0.95
    without = {k: v for k, v in attrs.items() if k != "radius"}
    same = np.array_equal(smoothness.ground_truth_mask(without, 64, dilate=1), gt)
    assert same == (scenes == "standard")


def test_added_noise_is_measured_and_the_ratio_uses_the_floor(real):
    images, attrs = real
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(images + rng.normal(0.0, 6.0, images.shape)), 0, 255).astype(np.uint8)
    out = smoothness.smoothness({"noisy": noisy, "same": images}, images, attrs)
    assert out["real"]["mean_std"] == 0.0 and out["same"]["ratio"] == 0.0
    # clipping at 0 / 255 shrinks the spread a little on the black / white backgrounds
    assert 5.0 < out["noisy"]["mean_std"] < 6.2
    assert out["noisy"]["ratio"] == pytest.approx(out["noisy"]["mean_std"] / smoothness.FLOOR)
    assert out["real_ground_truth_mask"]["background_fraction"] > 0.6
    one = np.asarray(images[:1], np.float64)
    mask = smoothness.background_mask(images[:1])
    one[0][mask[0]] += np.where(np.arange(mask[0].sum()) % 2, 4.0, -4.0)[:, None]  # +-4 levels: std exactly 4
    assert smoothness.background_std(one, mask)[0] == pytest.approx(4.0, abs=0.05)
