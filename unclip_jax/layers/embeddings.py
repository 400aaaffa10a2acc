"""Embedding layers shared by the networks: sinusoidal timestep features and MLPs."""

from __future__ import annotations

import math

import jax.numpy as jnp


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
