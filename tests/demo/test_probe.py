"""The layout probe and the embedding's attribute variance (unclip_jax.demo.probe)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from unclip_jax.demo import probe
from unclip_jax.diffusion.config import diffusion_from_config
from unclip_jax.diffusion.respace import respace


def test_attribute_r2_closed_form():
    labels = np.array([0, 0, 1, 1, 2, 2])
    means = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, -3.0]])
    assert probe.attribute_r2(means[labels], labels) == pytest.approx(1.0)  # constant within each class
    # equal class means: the labels explain nothing
    z = np.array([[1.0], [-1.0], [2.0], [-2.0], [0.5], [-0.5]])
    assert probe.attribute_r2(z, labels) == pytest.approx(0.0)
    # class means 0 / 4 around the mean 2, +-1 within: between 4 * 2^2 = 16, within 4 * 1 = 4
    z = np.array([[-1.0], [1.0], [3.0], [5.0]])
    assert probe.attribute_r2(z, np.array([0, 0, 1, 1])) == pytest.approx(16 / 20)
    # a second dimension of pure within-class variance counts in the total
    z2 = np.concatenate([z, [[2.0], [-2.0], [2.0], [-2.0]]], 1)
    assert probe.attribute_r2(z2, np.array([0, 0, 1, 1])) == pytest.approx(16 / (20 + 16))
    with pytest.raises(ValueError, match="3 labels for 4 embeddings"):
        probe.attribute_r2(z, np.array([0, 1, 1]))


def test_linear_probe_reads_directions_that_carry_the_label_and_not_lengths():
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=400)
    centres = 3.0 * np.eye(16)[:4]  # class k along axis k
    z = centres[labels] + 0.3 * rng.standard_normal((400, 16))
    w = probe.fit_linear_probe(z[:300], labels[:300])
    assert w.shape == (17, 4)  # 16 dimensions + bias, 4 classes
    assert probe.probe_accuracy(w, z[300:], labels[300:]) == 1.0
    # each row scaled by its own factor (a guided prior's longer z_i) reads the same
    scaled = z[300:] * rng.uniform(0.5, 3.0, (100, 1))
    assert probe.probe_accuracy(w, scaled, labels[300:]) == 1.0
    # a label z does not carry reads near chance on held-out embeddings
    other = rng.integers(4, size=400)
    w_other = probe.fit_linear_probe(z[:300], other[:300])
    assert probe.probe_accuracy(w_other, z[300:], other[300:]) < 0.45
    # the probe's class order follows the labels: every prediction of a swapped label set is swapped
    swapped = np.array([1, 0, 2, 3])[labels]
    w_swapped = probe.fit_linear_probe(z[:300], swapped[:300])
    assert probe.probe_accuracy(w_swapped, z[300:], swapped[300:]) == 1.0
    with pytest.raises(ValueError, match="3 labels for 4 embeddings"):
        probe.fit_linear_probe(z[:4], labels[:3])
    with pytest.raises(ValueError, match="3 labels for 4 embeddings"):
        probe.probe_accuracy(w, z[:4], labels[:3])


def test_one_object_labels_keeps_the_first_object_of_one_object_scenes():
    attrs = {
        "attr/num_objects": np.array([1, 2, 1]),
        "attr/shape": np.array([[3, -1], [0, 1], [2, -1]]),
        "attr/colour": np.array([[5, -1], [1, 2], [0, -1]]),
        "attr/size": np.array([[1, -1], [0, 0], [0, -1]]),
        "attr/background": np.array([2, 0, 1]),
        "attr/position": np.array([4, -1, 0]),
    }
    one, labels = probe.one_object_labels(attrs)
    np.testing.assert_array_equal(one, [True, False, True])
    assert set(labels) == set(probe.R2_ATTRIBUTES)
    np.testing.assert_array_equal(labels["shape"], [3, 2])
    np.testing.assert_array_equal(labels["colour"], [5, 0])
    np.testing.assert_array_equal(labels["background"], [2, 1])
    np.testing.assert_array_equal(labels["position"], [4, 0])


def test_level_index_finds_the_closest_kept_timestep():
    d = respace(diffusion_from_config({"steps": 1000}), probe.PROBE_STEPS)
    tmap = np.asarray(d.timestep_map_array)
    for t0 in probe.PROBE_T:
        i = probe.level_index(d, t0)
        assert np.abs(tmap - t0).min() == abs(tmap[i] - t0)
    assert probe.level_index(d, 10_000) == len(tmap) - 1 and probe.level_index(d, -5) == 0


@pytest.mark.parametrize("index", [0, 7, 30])  # not the last: x0 = (x_t - ...) / sqrt(abar) amplifies float noise
def test_denoise_from_returns_x0_for_the_true_noise_and_reads_the_conditioning(index):
    """An epsilon network that returns the very noise ``q_sample`` drew brings deterministic DDIM back to x0 exactly,
    but only if the chain is entered at the level the image was noised to; a network that predicts the image from
    its conditioning returns that conditioning's image."""
    d = respace(diffusion_from_config({"steps": 1000, "mean_type": "epsilon"}), "50")
    x0 = np.random.default_rng(0).uniform(-0.9, 0.9, (2, 8, 8, 3)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    noise = jax.random.normal(key, x0.shape)  # what denoise_from draws from the same key
    out = probe.denoise_from(d, lambda x_t, t: noise, x0, index, key)
    np.testing.assert_allclose(np.asarray(out), x0, atol=2e-5)
    # the same network given another noise draw does not: the output depends on the noised start
    other = probe.denoise_from(d, lambda x_t, t: noise, x0, index, jax.random.PRNGKey(4))
    assert np.abs(np.asarray(other) - x0).max() > 1e-2

    dx = respace(diffusion_from_config({"steps": 1000, "mean_type": "x_start"}), "50")
    target = np.random.default_rng(1).uniform(-0.9, 0.9, x0.shape).astype(np.float32)
    out = probe.denoise_from(dx, lambda x_t, t, target: target, x0, index, key, cond={"target": target})
    np.testing.assert_allclose(np.asarray(out), target, atol=2e-5)


def test_report_shows_the_prior_probe_and_reads_markers_written_before_it(tmp_path):
    from unclip_jax.demo import report, runner

    acc = {"correct": 1, "total": 2, "accuracy": 0.5}
    old = {
        "r2": {"shape": 0.37},
        "r2_images": 10,
        "rows": [{"t0": 500, "own": {"shape": acc}, "other": {"shape": acc}}],
    }
    old |= {"n": 2, "steps": "25"}
    marker = {"name": "probe", "title": "probe", "seconds": 1.0, "commands": [], "finished": "2026-12-06 20:00:00"}
    runner.write_marker(tmp_path, "probe", marker | {"outputs": old})
    body = report.write_report(tmp_path, ["probe"]).read_text()
    assert "z_i variance explained" in body and "linear probe" not in body
    new = old | {"z_probe": {"shape": {"real": 0.93, "prior": 0.74}}, "z_probe_images": 134}
    runner.write_marker(tmp_path, "probe", marker | {"outputs": new})
    body = report.write_report(tmp_path, ["probe"]).read_text()
    assert "linear probe, prior&#x27;s z_i" in body and "134 one-object validation images" in body
    assert "0.93" in body and "0.74" in body
