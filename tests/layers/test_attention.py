"""Attention and transformer block: closed-form softmax, masks, KV cache, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.layers.attention import (
    MultiHeadAttention,
    combine_masks,
    dot_product_attention,
    make_causal_mask,
    make_padding_mask,
)
from unclip_jax.layers.transformer import Transformer, quick_gelu


def _naive_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_dot_product_attention_matches_softmax_formula():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    key_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    mask = combine_masks(make_causal_mask(5), make_padding_mask(jnp.asarray(key_mask)))
    assert mask.shape == (2, 1, 5, 5)
    out = dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, np.asarray(mask)), atol=1e-5)


def test_causal_attention_ignores_future_tokens():
    module = MultiHeadAttention(num_heads=2, head_dim=4)
    x = jax.random.normal(jax.random.key(0), (1, 6, 8))
    params = module.init(jax.random.key(1), x)
    mask = make_causal_mask(6)
    y = module.apply(params, x, mask=mask)
    x2 = x.at[:, 4:].set(100.0)
    y2 = module.apply(params, x2, mask=mask)
    np.testing.assert_allclose(np.asarray(y[:, :4]), np.asarray(y2[:, :4]), atol=1e-6)
    assert not np.allclose(np.asarray(y[:, 4:]), np.asarray(y2[:, 4:]))


def test_kv_cache_decoding_equals_full_causal_pass():
    kw = dict(num_layers=2, num_heads=2, head_dim=4, mlp_dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    full = Transformer(**kw)
    params = full.init(jax.random.key(1), x)["params"]
    want = full.apply({"params": params}, x, make_causal_mask(5))

    dec = Transformer(**kw, decode=True)
    cache = dec.init(jax.random.key(1), x)["cache"]
    outs = []
    for i in range(5):
        y, mut = dec.apply({"params": params, "cache": cache}, x[:, i : i + 1], None, mutable=["cache"])
        cache = mut["cache"]
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(want), atol=1e-5)


def test_remat_same_values_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    kw = dict(num_layers=2, num_heads=2, head_dim=4, mlp_dim=16)
    params = Transformer(**kw).init(jax.random.key(1), x)

    def loss(p, remat):
        return jnp.sum(Transformer(**kw, remat=remat).apply(p, x, make_causal_mask(4)) ** 2)

    l0, g0 = jax.value_and_grad(loss)(params, False)
    l1, g1 = jax.value_and_grad(loss)(params, True)
    assert np.isclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), g0, g1)


def test_quick_gelu_formula():
    x = jnp.linspace(-4, 4, 9)
    np.testing.assert_allclose(np.asarray(quick_gelu(x)), np.asarray(x / (1 + np.exp(-1.702 * x))), rtol=1e-6)


def test_decode_rejects_multi_token_steps():
    dec = MultiHeadAttention(num_heads=1, head_dim=4, decode=True)
    x = jnp.ones((1, 3, 4))
    v = dec.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="one position per call"):
        dec.apply(v, x, mutable=["cache"])


def test_dot_product_attention_heads_major_equals_the_bqhd_contraction():
    """Both layouts of the attention core give the same output and gradients (the heads-major one is the default)."""
    from unclip_jax.layers import attention

    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4)))
    mask = jnp.asarray(r.random((2, 1, 5, 7)) > 0.3)

    def f(q, k, v):
        return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, mask=mask)))

    outs = {}
    for heads_major in (True, False):
        attention.HEADS_MAJOR.append(heads_major)
        try:
            outs[heads_major] = (f(q, k, v), jax.grad(f, (0, 1, 2))(q, k, v))
        finally:
            attention.HEADS_MAJOR.pop()
    np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-6)
    for a, b in zip(outs[True][1], outs[False][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert float(jnp.max(jnp.abs(a))) > 0.05
