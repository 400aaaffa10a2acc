"""Classifier-free guidance as a wrapper of ``denoise_fn`` (Ho & Salimans 2021; GLIDE Sec. 2.3; unCLIP Sec. 2).

API (other modules code against this):
    ``classifier_free_guidance(denoise_fn, guidance_scale, cond, uncond, *, guided_channels=None, batched=True)``
    returns ``guided_fn(x_t, t) -> model_output`` to hand to the samplers (with ``cond=None`` there):
    ``out = uncond_out + s * (cond_out - uncond_out)`` on the guided channels (eps / x_0 / v part), computed as
    ``where(s == 1, cond_out, ...)`` so that s = 1 gives the conditional output exactly and s = 0 the
    unconditional one; the remaining channels (learned-range variance values) come from the conditional branch,
    as in diffusers' ``UnCLIPPipeline`` decoder loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import DenoiseFn


def _concat_trees(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    if set(cond) != set(uncond):
        raise ValueError(
            f"classifier_free_guidance: cond keys {sorted(cond)} and uncond keys {sorted(uncond)} must be the same"
        )

    def cat(a, b):
        if hasattr(a, "ndim") and a.ndim >= 1:
            return jnp.concatenate([jnp.asarray(a), jnp.asarray(b).astype(jnp.asarray(a).dtype)], axis=0)
        if a is not b and a != b:
            raise ValueError(f"classifier_free_guidance: non-batched condition values differ ({a!r} vs {b!r})")
        return a

    return {k: jax.tree.map(cat, cond[k], uncond[k]) for k in cond}


def classifier_free_guidance(
    denoise_fn: DenoiseFn,
    guidance_scale: float | jax.Array,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    *,
    guided_channels: int | None = None,
    batched: bool = True,
) -> DenoiseFn:
    """Wraps ``denoise_fn`` with classifier-free guidance.

    Args:
        denoise_fn: ``denoise_fn(x_t, t, **kwargs)``.
        guidance_scale: s; a Python number, a scalar array or per-example ``[B]``. A Python 1 (0) calls only the
            conditional (unconditional) branch.
        cond: keyword arguments of the conditional call (arrays batched on axis 0 like x_t).
        uncond: keyword arguments of the unconditional call (same keys and structure as ``cond``).
        guided_channels: how many leading channels of the output's last axis to guide. None: the first
            ``x_t.shape[-1]`` when the output has ``2 * x_t.shape[-1]`` channels (learned variance), else all.
        batched: one call on the doubled batch ``[cond; uncond]`` (faster) instead of two calls.

    Returns:
        ``guided_fn(x_t, t, **ignored_none)`` with the output shape of ``denoise_fn``.
    """
    if isinstance(guidance_scale, (int, float)) and guidance_scale in (0, 1):
        kwargs = dict(cond if guidance_scale == 1 else uncond)
        return lambda x_t, t, **_: denoise_fn(x_t, t, **kwargs)

    def guided_fn(x_t: jax.Array, t: jax.Array, **extra: Any) -> jax.Array:
        if any(v is not None for v in extra.values()):
            raise ValueError("classifier_free_guidance: give conditions through cond/uncond, not the sampler's cond")
        if batched:
            both = _concat_trees(cond, uncond)
            out = denoise_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), **both)
            out_cond, out_uncond = jnp.split(out, 2, axis=0)
        else:
            out_cond = denoise_fn(x_t, t, **cond)
            out_uncond = denoise_fn(x_t, t, **uncond)
        c = guided_channels
        if c is None:
            c = x_t.shape[-1] if out_cond.shape[-1] == 2 * x_t.shape[-1] else out_cond.shape[-1]
        s = jnp.asarray(guidance_scale, dtype=out_cond.dtype)
        s = s.reshape(s.shape + (1,) * (out_cond.ndim - s.ndim))
        g_cond, g_uncond = out_cond[..., :c], out_uncond[..., :c]
        guided = jnp.where(s == 1, g_cond, g_uncond + s * (g_cond - g_uncond))
        return jnp.concatenate([guided, out_cond[..., c:]], axis=-1) if c < out_cond.shape[-1] else guided

    return guided_fn
