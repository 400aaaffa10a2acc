"""Diversity measures in closed form, and the caption-only decoder path really feeding a null image embedding."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from unclip_jax.demo import diversity
from unclip_jax.pipeline import StageSettings


def test_mean_pairwise_distance_closed_form():
    e = np.eye(3) * np.asarray([[1.0], [2.0], [5.0]])  # orthogonal, any lengths: every pair 1 - cos = 1
    assert diversity.mean_pairwise_distance(e) == pytest.approx(1.0)
    v = np.asarray([[0.3, -1.2, 2.0]])
    assert diversity.mean_pairwise_distance(np.concatenate([v, 4 * v, 0.5 * v])) == pytest.approx(0.0, abs=1e-12)
    assert diversity.mean_pairwise_distance(np.concatenate([v, -v])) == pytest.approx(2.0)
    # 60 degrees apart: 1 - cos = 1/2; with a copy of the first: pairs (0, 1/2, 1/2) -> 1/3
    a, b = [1.0, 0.0], [0.5, math.sqrt(3) / 2]
    assert diversity.mean_pairwise_distance(np.asarray([a, b])) == pytest.approx(0.5)
    assert diversity.mean_pairwise_distance(np.asarray([a, b, a])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        diversity.mean_pairwise_distance(np.ones((1, 4)))


def test_entropy_bits_closed_form():
    assert diversity.entropy_bits(np.zeros(16, int), 5) == 0.0
    assert diversity.entropy_bits(np.arange(16) % 4, 5) == pytest.approx(2.0)  # uniform over 4 of 5 classes
    assert diversity.entropy_bits(np.arange(6) % 6, 6) == pytest.approx(math.log2(6))
    # p = (3/4, 1/4): H = -(3/4 log2 3/4 + 1/4 log2 1/4)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert diversity.entropy_bits(np.asarray([1, 1, 1, 0]), 2) == pytest.approx(h)


def test_measure_reads_only_the_free_heads():
    heads = {"position": np.asarray([0, 1, 2, 3]), "size_a": np.asarray([0, 0, 1, 1]), "background": np.zeros(4)}
    heads["colour_a"] = np.asarray([0, 1, 2, 3])  # stated by the prompt: not counted
    m = diversity.measure(np.zeros((4, 8, 8, 3)), np.eye(4), heads, {"position": 6, "size_a": 2, "background": 3})
    assert m["entropy"] == {"position": pytest.approx(2.0), "size_a": pytest.approx(1.0), "background": 0.0}
    assert m["mean_entropy"] == pytest.approx(1.0) and m["clip_distance"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def pipe():
    from unclip_jax.pipeline.testing import random_pipeline

    return random_pipeline("test", seed=0, super_res_last=False)


SETTINGS = {"prior": StageSettings(2, guidance_scale=2.0), "decoder": StageSettings(2, guidance_scale=1.0)}


def test_caption_only_feeds_the_null_embedding_and_zero_feeds_zeros(pipe):
    """Caption-only samples never see a prior z_i: the returned z_i are zeros; with the decoder's learned null
    embedding set to zero the "learned" (caption-only) and "zero" paths draw identical images, and with it non-zero
    they differ (so the zero path really feeds zeros, not the learned embedding)."""
    learned = diversity.sample(pipe, "a red circle", "caption-only", 4.0, 2, SETTINGS, seed=3)
    zero = diversity.sample(pipe, "a red circle", "caption-only", 4.0, 2, SETTINGS, seed=3, zero=True)
    unclip = diversity.sample(pipe, "a red circle", "unclip", 4.0, 2, SETTINGS, seed=3)
    assert np.all(learned["image_embeds"] == 0) and np.all(zero["image_embeds"] == 0)
    assert np.any(unclip["image_embeds"] != 0)
    assert not np.allclose(learned["decoder_images"], zero["decoder_images"])

    comp = pipe.components["decoder"]
    name = "learned_classifier_free_guidance_embeddings"

    def zero_null(path, x):
        return np.zeros_like(x) if any(getattr(k, "key", None) == name for k in path) else x

    nulled = jax.tree_util.tree_map_with_path(zero_null, comp.variables)
    try:
        pipe.components["decoder"] = type(comp)(comp.module, nulled)
        a = diversity.sample(pipe, "a red circle", "caption-only", 4.0, 2, SETTINGS, seed=3)
        b = diversity.sample(pipe, "a red circle", "caption-only", 4.0, 2, SETTINGS, seed=3, zero=True)
    finally:
        pipe.components["decoder"] = comp
    np.testing.assert_array_equal(a["decoder_images"], b["decoder_images"])
    assert a["decoder_images"].shape[0] == 2 and "super_res_images" not in a  # stops at the decoder


def test_sample_sets_only_the_decoder_guidance(pipe, monkeypatch):
    seen = {}

    def fake_call(prompt, **kw):
        seen.update(kw, prompt=prompt)
        return {}

    monkeypatch.setattr(pipe, "__call__", fake_call, raising=False)
    with pytest.raises(ValueError, match="mode"):
        diversity.sample(pipe, "x", "glide", 1.0, 2, SETTINGS)


def test_fidelity_reads_the_prompt_colour_and_shape():
    # "a blue square": blue is colour 2, square is shape 1
    heads = {"colour_a": np.asarray([2, 2, 0, 2]), "shape_a": np.asarray([1, 0, 0, 0])}
    assert diversity.fidelity("a blue square", heads) == {"colour_accuracy": 0.75, "shape_accuracy": 0.25}
