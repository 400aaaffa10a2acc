"""The blockwise (flash) attention core equals the plain softmax(q k^T) v in values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.layers import unet_blocks as ub
from unclip_jax.layers.blockwise_attention import blockwise_attention


def _inputs(lq=24, lk=31, b=2, h=3, d=8, dtype=jnp.float32):
    r = np.random.default_rng(0)
    q, k, v, w = (
        jnp.asarray(r.standard_normal(s), dtype) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d), (b, h, lq, d))
    )
    keep = np.ones((b, lk), np.float32)
    keep[0, :5] = 0  # padded context tokens of the first example
    return q * d**-0.5, k, v, jnp.asarray(keep), w


def _reference(q, k, v, keep):
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(keep[:, None, None, :] > 0.5, logits, ub.MASK_BIAS)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))


@pytest.mark.parametrize("block_q", [4, 8, 24])
def test_values_and_gradients_equal_the_plain_softmax(block_q):
    q, k, v, keep, w = _inputs()

    def loss(core):
        return lambda q, k, v: jnp.sum(core(q, k, v) * w)

    ours = loss(lambda q, k, v: blockwise_attention(q, k, v, keep, block_q, ub.MASK_BIAS))
    ref = loss(lambda q, k, v: _reference(q, k, v, keep))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5)
    grads = jax.grad(ours, (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads, jax.grad(ref, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
        assert float(jnp.max(jnp.abs(a))) > 0.05
    np.testing.assert_array_equal(np.asarray(grads[1])[0, :, :5], 0.0)  # masked keys get no gradient
    np.testing.assert_array_equal(np.asarray(grads[2])[0, :, :5], 0.0)


def test_bfloat16_inputs_keep_float32_statistics():
    q, k, v, keep, _ = _inputs(dtype=jnp.bfloat16)
    out = blockwise_attention(q, k, v, keep, 8, ub.MASK_BIAS)
    assert out.dtype == jnp.bfloat16
    ref = _reference(q, k, v, keep)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2)


def test_queries_must_fill_whole_blocks():
    q, k, v, keep, _ = _inputs(lq=10)
    with pytest.raises(ValueError, match="not a multiple of block_q=4"):
        blockwise_attention(q, k, v, keep, 4, ub.MASK_BIAS)


def test_the_added_kv_block_uses_it_above_one_block_and_agrees_with_the_plain_core(monkeypatch):
    """AddedKVAttention at 4x4 = 16 queries with BLOCK_Q = 4 (four blocks) equals the bhqd layout."""
    monkeypatch.setattr(ub, "BLOCK_Q", 4)
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((2, 4, 4, 32)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((2, 5, 12)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    block = ub.AddedKVAttention(head_dim=8, groups=4)
    params = block.init(jax.random.PRNGKey(0), x, ctx, mask)
    # the zero-initialised output projection would hide the core: give it weights
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(r.standard_normal(a.shape), a.dtype) if "to_out" in jax.tree_util.keystr(p) else a,
        params,
    )

    def run(layout):
        def f(x):
            with ub.attention_layout(layout):
                return jnp.sum(block.apply(params, x, ctx, mask) ** 2)

        return f(x), jax.grad(f)(x)

    calls = []
    real = ub.blockwise_attention
    monkeypatch.setattr(ub, "blockwise_attention", lambda *a: calls.append(a[4]) or real(*a))
    (y, g) = run("blockwise")
    assert calls and calls[0] == 4
    y2, g2 = run("bhqd")
    np.testing.assert_allclose(y, y2, rtol=1e-5)
    np.testing.assert_allclose(g, g2, rtol=1e-4, atol=1e-5)
