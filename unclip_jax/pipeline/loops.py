"""One diffusion stage's sampling loop inside the cascade program: the x_T draw and the DDPM or DDIM loop.

Randomness as in `unclip_jax.diffusion.sampling`: a stage's key is split into (init, loop); x_T = normal(init) and
step k's noise = normal(fold_in(loop, k)), so a stage given its x_T draws the same noise as one that drew it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import GaussianDiffusion, ddim_sample_loop, p_sample_loop
from unclip_jax.pipeline.settings import StageSettings


def initial_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """x_T ~ N(0, I) of ``shape`` from the init half of a stage key."""
    init_key, _ = jax.random.split(key)
    return jax.random.normal(init_key, tuple(shape), jnp.float32)


def repeat_rows(tree: Any, n: int) -> Any:
    """Every array of ``tree`` with each row repeated ``n`` times (``repeat_interleave``: caption-major)."""
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), tree)


def sample_loop(
    diffusion: GaussianDiffusion,
    settings: StageSettings,
    denoise_fn: Callable[..., jax.Array],
    x_T: jax.Array,
    key: jax.Array,
    cond: Mapping[str, Any] | None,
    return_intermediates: bool,
    eta: jax.Array,
) -> Any:
    """The stage's sampler (``settings.sampler``) from ``x_T``: strided ancestral DDPM or DDIM with ``eta``.

    Returns:
        x_0, or ``(x_0, intermediates)`` with ``return_intermediates`` (see `unclip_jax.diffusion.sampling`).
    """
    if settings.sampler == "ddpm":
        return p_sample_loop(
            diffusion, denoise_fn, None, key, cond=cond, x_T=x_T, return_intermediates=return_intermediates
        )
    return ddim_sample_loop(
        diffusion, denoise_fn, None, key, cond=cond, x_T=x_T, eta=eta, return_intermediates=return_intermediates
    )
