"""Embedding layers shared by the networks: sinusoidal timestep features and MLPs."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers import axes


def timestep_embedding(
    timesteps: jnp.ndarray,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jnp.ndarray:
    """Sinusoidal timestep features (DDPM / guided-diffusion; diffusers ``get_timestep_embedding``).

    Args:
      timesteps: [B] integer or float timesteps.
      dim: feature size.
      flip_sin_to_cos: order the halves as [cos, sin] (guided-diffusion, Karlo) instead of [sin, cos].
      downscale_freq_shift: the ``freq_shift`` of diffusers (0 for guided-diffusion, 1 for DDPM).
      scale: multiplier applied to the arguments.
      max_period: controls the minimum frequency.

    Returns:
      [B, dim] float32 features (an odd ``dim`` is zero-padded).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on sinusoidal features: ``linear_2(act(linear_1(x)))`` (diffusers ``TimestepEmbedding``;
    guided-diffusion ``time_embed``).

    Attributes:
      time_embed_dim: hidden width (``linear_1`` output).
      out_dim: output width (defaults to ``time_embed_dim``).
      act: "silu" (default) or "gelu".
    """

    time_embed_dim: int
    out_dim: int | None = None
    act: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, C] sinusoidal features -> [B, out_dim]."""
        acts = {"silu": nn.silu, "swish": nn.silu, "gelu": lambda v: nn.gelu(v, approximate=False)}
        if self.act not in acts:
            raise ValueError(f"TimestepEmbedding.act: unknown activation {self.act!r}; expected one of {sorted(acts)}")

        def dense(features, in_axis, out_axis, name):
            return nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, out_axis)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
                name=name,
            )

        h = dense(self.time_embed_dim, axes.EMBED, axes.MLP, "linear_1")(x)
        h = acts[self.act](h)
        return dense(self.out_dim or self.time_embed_dim, axes.MLP, axes.EMBED, "linear_2")(h)
