"""Samplers: strided ancestral DDPM (as diffusers' UnCLIPScheduler), DDIM with eta, and DDIM inversion.

API (other modules code against these):
    * Single steps (``t`` = scalar table index of ``diffusion``; noise given explicitly):
      ``p_sample``, ``ddim_sample``, ``ddim_reverse_sample`` -> ``dict(sample, pred_xstart)``.
    * Loops, each ONE ``lax.scan`` (trace them inside your own ``jax.jit``; pass network parameters through the
      closure of ``denoise_fn`` inside the jitted function so they are not baked in as constants):
      ``p_sample_loop(diffusion, denoise_fn, shape, key, *, cond=None, x_T=None, return_intermediates=False)``
      ``ddim_sample_loop(..., eta=0.0, eps_from_clipped_xstart=True)``
      ``ddim_reverse_loop(diffusion, denoise_fn, x_start, *, cond=None, fixed_point_iters=0,
      return_intermediates=False)`` (image -> x_T; ``fixed_point_iters`` > 0 solves each inversion step as the exact
      inverse of the eta-0 sampling step by fixed-point iteration, at (1 + iters) network calls per step).
      ``diffusion`` is normally respaced (`respace.respace`); the loop runs its indices S-1 .. 0 and ``denoise_fn``
      sees the original timesteps. The key is split once into (init, loop): x_T = normal(init) unless ``x_T`` is
      given, and the noise of loop step k (k = 0 first) is ``normal(fold_in(loop, k))``, so the same key gives the
      same output. With ``return_intermediates`` the loops return ``(x, dict(x, pred_xstart, noise, t))`` stacked
      over steps in loop order (``x[k]`` is the sample AFTER step k; ``t[k]`` the network timestep of step k).
    * ``cond`` is a dict of keyword arguments for ``denoise_fn``; classifier-free guidance is a wrapper of
      ``denoise_fn`` (`guidance.classifier_free_guidance`).

Step-for-step equivalence with diffusers' ``UnCLIPScheduler.step(model_output, t, x, prev_timestep=t_prev)`` over
``space_timesteps(T, "unclipN")``: the respaced beta of index i is ``1 - abar_{t_i} / abar_{t_{i-1}}`` (UnCLIP's
recomputed beta; index 0 keeps beta_0 as UnCLIP's last step with prev_timestep=None), the mean is the posterior mean
of the clipped x_0 (DDPM eq. 7), the std is ``exp(0.5 * log_variance)`` of the ``fixed_small_log`` /
``learned_range`` variance, and no noise is added at index 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion.gaussian import DenoiseFn, GaussianDiffusion


def _nonzero(t: jax.Array, dtype: Any) -> jax.Array:
    return (jnp.asarray(t) != 0).astype(dtype)


def p_sample(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    cond: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1}|x_t) (DDPM Algorithm 2; UnCLIPScheduler.step).

    Args:
        diffusion: (respaced) diffusion.
        denoise_fn: network callable.
        x: ``[B, ..., C]`` sample at index ``t``.
        t: scalar int table index.
        noise: standard normal like ``x`` (ignored at ``t == 0``).
        cond: keyword arguments of ``denoise_fn``.

    Returns:
        dict(sample like x, pred_xstart like x).
    """
    out = diffusion.p_mean_variance(denoise_fn, x, t, **(cond or {}))
    std = jnp.exp(0.5 * out["log_variance"])
    sample = out["mean"] + _nonzero(t, x.dtype) * std * noise
    return dict(sample=sample.astype(x.dtype), pred_xstart=out["pred_xstart"])


def ddim_sample(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    cond: Mapping[str, Any] | None = None,
    eta: float = 0.0,
    eps_from_clipped_xstart: bool = True,
) -> dict[str, jax.Array]:
    """One DDIM step (Song et al. 2021, eq. 12 with sigma of eq. 16; guided-diffusion ``ddim_sample``).

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise`` with
    ``sigma = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev)``.

    Args:
        eps_from_clipped_xstart: use the eps re-derived from the clipped x0 (guided-diffusion / GLIDE; diffusers
            ``use_clipped_model_output=True``); False uses the model's own eps (diffusers' default).
        Others as `p_sample`.

    Returns:
        dict(sample, pred_xstart).
    """
    out = diffusion.p_mean_variance(denoise_fn, x, t, **(cond or {}))
    eps = out["eps"] if eps_from_clipped_xstart else out["model_eps"]
    abar = diffusion.extract_into_tensor(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion.extract_into_tensor(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    sample = mean + _nonzero(t, x.dtype) * sigma * noise
    return dict(sample=sample.astype(x.dtype), pred_xstart=out["pred_xstart"])


def ddim_reverse_sample(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x: jax.Array,
    t: jax.Array,
    cond: Mapping[str, Any] | None = None,
    fixed_point_iters: int = 0,
) -> dict[str, jax.Array]:
    """One deterministic DDIM inversion step from level ``abar_prev[t]`` up to ``abar[t]`` (the inverse of
    `ddim_sample` at eta=0 up to where the network is evaluated).

    The network is evaluated at (x, original timestep of index t), i.e. at the TARGET level as in diffusers'
    ``DDIMInverseScheduler`` pipelines; its output is read as eps (for x_start / v models: the eps it implies when x
    is read as x_t). Then ``x0 = (x - sqrt(1 - abar_prev) eps) / sqrt(abar_prev)`` and
    ``x_next = sqrt(abar) x0 + sqrt(1 - abar) eps``. No clipping. With ``fixed_point_iters`` > 0 eps is then
    re-evaluated at x_next and the step repeated, converging to the x_next whose eta-0 DDIM step returns x exactly
    (plain inversion has a first-order error wherever eps changes along the path). Index 0 starts from the clean image
    (abar_prev = 1), so `ddim_sample_loop` at eta=0 after `ddim_reverse_loop` reconstructs the input.

    Returns:
        dict(sample at level abar[t], pred_xstart).
    """
    t_model = diffusion.model_timesteps(t, x.shape[0])
    abar_prev = diffusion.extract_into_tensor(diffusion.alphas_cumprod_prev, t, x)
    abar = diffusion.extract_into_tensor(diffusion.alphas_cumprod, t, x)

    def eps_at(z):
        mean_output, _ = diffusion.split_model_output(denoise_fn(z, t_model, **(cond or {})), z)
        return diffusion.output_to_xstart_eps(mean_output, z, t)[1]

    def up(eps):
        pred_xstart = (x - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
        return (jnp.sqrt(abar) * pred_xstart + jnp.sqrt(1.0 - abar) * eps).astype(x.dtype), pred_xstart

    sample, pred_xstart = up(eps_at(x))
    if fixed_point_iters > 0:
        # Solve x_next = up(eps(x_next)): then the DDIM step from x_next returns x exactly.
        sample, pred_xstart = jax.lax.fori_loop(
            0, fixed_point_iters, lambda _, c: up(eps_at(c[0])), (sample, pred_xstart)
        )
    return dict(sample=sample, pred_xstart=pred_xstart)


def _init(shape: Sequence[int] | None, key: jax.Array, x_T: jax.Array | None, dtype: Any):
    init_key, loop_key = jax.random.split(key)
    if x_T is None:
        if shape is None:
            raise ValueError("sampling: give `shape` or `x_T`")
        x_T = jax.random.normal(init_key, tuple(shape), dtype)
    elif shape is not None and tuple(shape) != tuple(x_T.shape):
        raise ValueError(f"sampling: shape {tuple(shape)} disagrees with x_T.shape {x_T.shape}")
    return x_T, loop_key


def _descending_loop(diffusion, step_fn, x, loop_key, return_intermediates):
    num = diffusion.num_timesteps

    def body(x, k):
        t = num - 1 - k
        noise = jax.random.normal(jax.random.fold_in(loop_key, k), x.shape, x.dtype)
        out = step_fn(x, t, noise)
        ys = None
        if return_intermediates:
            ys = dict(
                x=out["sample"],
                pred_xstart=out["pred_xstart"],
                noise=noise,
                t=diffusion.model_timesteps(t),
            )
        return out["sample"], ys

    x, ys = jax.lax.scan(body, x, jnp.arange(num, dtype=jnp.int32))
    return (x, ys) if return_intermediates else x


def p_sample_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    shape: Sequence[int] | None,
    key: jax.Array,
    *,
    cond: Mapping[str, Any] | None = None,
    x_T: jax.Array | None = None,
    return_intermediates: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Strided ancestral sampling over all indices of ``diffusion`` (UnCLIPPipeline's loop; one ``lax.scan``).

    Args:
        diffusion: respaced diffusion (e.g. ``respace(d, "unclip25")``).
        denoise_fn: ``denoise_fn(x_t, t, **cond)``.
        shape: ``[B, ...]`` of the sample (may be None when ``x_T`` is given).
        key: PRNG key (see module docstring for how it is used).
        cond: keyword arguments of ``denoise_fn``.
        x_T: optional initial noise.
        return_intermediates: also return per-step stacks.
        dtype: dtype of the generated noise.

    Returns:
        x_0 ``shape``, or ``(x_0, intermediates)``.
    """
    x, loop_key = _init(shape, key, x_T, dtype)
    step = lambda x, t, noise: p_sample(diffusion, denoise_fn, x, t, noise, cond)
    return _descending_loop(diffusion, step, x, loop_key, return_intermediates)


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    shape: Sequence[int] | None,
    key: jax.Array,
    *,
    cond: Mapping[str, Any] | None = None,
    x_T: jax.Array | None = None,
    eta: float = 0.0,
    eps_from_clipped_xstart: bool = True,
    return_intermediates: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """DDIM sampling (Song et al. 2021) over all indices of ``diffusion``; one ``lax.scan``.

    Arguments as `p_sample_loop`, plus ``eta`` (0: deterministic DDIM, 1: DDPM-like) and
    ``eps_from_clipped_xstart`` (see `ddim_sample`).
    """
    x, loop_key = _init(shape, key, x_T, dtype)
    step = lambda x, t, noise: ddim_sample(diffusion, denoise_fn, x, t, noise, cond, eta, eps_from_clipped_xstart)
    return _descending_loop(diffusion, step, x, loop_key, return_intermediates)


def ddim_reverse_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_start: jax.Array,
    *,
    cond: Mapping[str, Any] | None = None,
    fixed_point_iters: int = 0,
    return_intermediates: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """DDIM inversion: clean ``x_start`` -> x_T at the last index of ``diffusion`` (deterministic, no key).

    Runs `ddim_reverse_sample` for indices 0 .. S-1 in one ``lax.scan``. Feeding the result as ``x_T`` to
    ``ddim_sample_loop(..., eta=0)`` with the same ``diffusion`` (with ``clip_denoised=None``) returns ``x_start``
    up to the inversion's discretisation error.

    Returns:
        x_T like ``x_start``, or ``(x_T, dict(x, pred_xstart, t))`` stacked over the S steps.
    """

    def body(x, t):
        out = ddim_reverse_sample(diffusion, denoise_fn, x, t, cond, fixed_point_iters)
        ys = None
        if return_intermediates:
            ys = dict(x=out["sample"], pred_xstart=out["pred_xstart"], t=diffusion.model_timesteps(t))
        return out["sample"], ys

    x, ys = jax.lax.scan(body, x_start, jnp.arange(diffusion.num_timesteps, dtype=jnp.int32))
    return (x, ys) if return_intermediates else x
