"""GroupNorm (+ SiLU) with the hand-written backward: forward and gradients equal flax.linen.GroupNorm's (two-pass
variance) under XLA's autodiff, and the parameters are flax's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.layers import norm
from unclip_jax.layers.unet_blocks import group_norm


def _reference(x, scale, bias, groups, eps, silu):
    m = nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False)
    y = m.apply({"params": {"scale": scale, "bias": bias}}, x)
    return nn.silu(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_flax_forward_and_gradients(silu):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 12)) * 3 + 1.5, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(12), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(12), jnp.float32)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def ours(x, s, b):
        return jnp.sum(norm.group_norm_nhwc(x, s, b, 4, 1e-5, silu) * w)

    def ref(x, s, b):
        return jnp.sum(_reference(x, s, b, 4, 1e-5, silu) * w)

    np.testing.assert_allclose(
        norm.group_norm_nhwc(x, scale, bias, 4, 1e-5, silu), _reference(x, scale, bias, 4, 1e-5, silu), atol=2e-6
    )
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Not vacuous: the input gradient of a normalisation sums to ~0 per group but is far from zero.
    assert float(jnp.max(jnp.abs(g_ours[0]))) > 0.1


def test_group_norm_module_has_flax_parameters_and_both_impls_agree():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 8)), jnp.float32)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return group_norm(2, 1e-6, jnp.float32, jnp.float32, "norm1", silu=True)(x)

    with norm.default_impl("flax"):
        v_flax = Net().init(jax.random.PRNGKey(0), x)
        y_flax = Net().apply(v_flax, x)
    with norm.default_impl("custom"):
        v = Net().init(jax.random.PRNGKey(0), x)
        y = Net().apply(v_flax, x)
    assert jax.tree.map(jnp.shape, nn.unbox(v)) == jax.tree.map(jnp.shape, nn.unbox(v_flax))
    assert set(v["params"]["norm1"]) == {"scale", "bias"}
    np.testing.assert_allclose(y, y_flax, atol=2e-6)
    assert float(jnp.max(jnp.abs(y_flax))) > 0.5
    with pytest.raises(ValueError, match="expected one of"):
        with norm.default_impl("nope"):
            pass
