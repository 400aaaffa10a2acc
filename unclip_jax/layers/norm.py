"""GroupNorm over the channels of NHWC activations, optionally followed by SiLU, with a hand-written backward.

Numerics are torch ``nn.GroupNorm``'s (Wu & He 2018): float32 statistics per (example, group) over the spatial
positions and the group's channels, two-pass variance ``mean((x - mean)^2)``, ``y = (x - mean) * rsqrt(var + eps)
* scale + bias``. ``silu=True`` applies ``y * sigmoid(y)`` after it (the U-Nets' ``nonlinearity(norm(x))``).

The custom VJP keeps only the input and the per-group mean and reciprocal std and recomputes the normalised
activations in the backward, the closed form ``dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh))`` per group
with ``dxh = dy * scale`` (and ``dy`` through SiLU's derivative ``s * (1 + y (1 - s))`` when fused): one
candidate against XLA's autodiff of the same forward, selected with :func:`default_impl`.

:class:`GroupNorm` has the parameters ``scale`` and ``bias`` of ``flax.linen.GroupNorm`` (same names, shapes,
initialisers and logical axes), so checkpoints and converters see no difference. :func:`default_impl` is read by
:func:`unclip_jax.layers.unet_blocks.group_norm`: ``flax`` (the default: ``flax.linen.GroupNorm`` with torch's
two-pass variance, then ``nn.silu``, differentiated by XLA), ``flax_fast_variance`` (the same with the one-pass
variance ``E[x^2] - E[x]^2``: fewer passes, but its cancellation changes samples with the batch's sharding) or
``custom`` (this module), for A/B runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from unclip_jax.layers import axes

Dtype = Any
IMPLS = ("flax_fast_variance", "flax", "custom")
_DEFAULT_IMPL = ["flax"]


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
    """Within the block, :class:`GroupNorm` modules with ``impl=None`` trace with ``impl`` (A/B benchmarks); the
    choice is made at trace time, so jit a fresh function per choice."""
    if impl not in IMPLS:
        raise ValueError(f"norm.default_impl({impl!r}): expected one of {IMPLS}")
    _DEFAULT_IMPL.append(impl)
    try:
        yield
    finally:
        _DEFAULT_IMPL.pop()


def current_impl() -> str:
    """The implementation :func:`default_impl` selects now (``flax`` outside any block)."""
    return _DEFAULT_IMPL[-1]


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    return x.astype(jnp.float32).reshape(b, -1, groups, c // groups)


def _stats(xg: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    return mean, lax.rsqrt(var + eps)


def _forward(x, scale, bias, groups, eps, silu):
    xg = _grouped(x, groups)
    mean, rstd = _stats(xg, eps)
    y = ((xg - mean) * rstd).reshape(x.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    if silu:
        y = y * jax.nn.sigmoid(y)
    return y.astype(x.dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_nhwc(
    x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, silu: bool = False
) -> jax.Array:
    """GroupNorm (then SiLU when ``silu``) of ``x`` [B, ..., C] over ``groups`` channel groups; ``scale`` and
    ``bias`` [C]. Output in ``x``'s dtype."""
    return _forward(x, scale, bias, groups, eps, silu)[0]


def _fwd(x, scale, bias, groups, eps, silu):
    y, (mean, rstd) = _forward(x, scale, bias, groups, eps, silu)
    return y, (x, scale, bias, mean, rstd)


def _bwd(groups, eps, silu, res, g):
    x, scale, bias, mean, rstd = res
    xg = _grouped(x, groups)
    xh = (xg - mean) * rstd  # [B, HW, G, C/G]
    xh_flat = xh.reshape(x.shape)
    scale32 = scale.astype(jnp.float32)
    dy = g.astype(jnp.float32)
    if silu:
        y = xh_flat * scale32 + bias.astype(jnp.float32)
        s = jax.nn.sigmoid(y)
        dy = dy * (s * (1.0 + y * (1.0 - s)))
    red = tuple(range(x.ndim - 1))
    dbias = jnp.sum(dy, axis=red)
    dscale = jnp.sum(dy * xh_flat, axis=red)
    dxh = _grouped(dy * scale32, groups)
    m1 = jnp.mean(dxh, axis=(1, 3), keepdims=True)
    m2 = jnp.mean(dxh * xh, axis=(1, 3), keepdims=True)
    dx = (rstd * (dxh - m1 - xh * m2)).reshape(x.shape)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


group_norm_nhwc.defvjp(_fwd, _bwd)


class GroupNorm(nn.Module):
    """GroupNorm over the last axis (optionally + SiLU) through :func:`group_norm_nhwc`, with
    ``flax.linen.GroupNorm``'s parameters.

    Attributes:
      num_groups: channel groups.
      epsilon: added to the variance.
      silu: apply SiLU to the normalised output (fused into the same custom VJP).
      dtype: output dtype (statistics in float32).
      param_dtype: dtype of ``scale`` / ``bias``.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    silu: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {c} channels")
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)), (c,), self.param_dtype
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)), (c,), self.param_dtype
        )
        x = x.astype(jnp.promote_types(x.dtype, self.dtype))
        return group_norm_nhwc(x, scale, bias, self.num_groups, float(self.epsilon), bool(self.silu)).astype(self.dtype)
