"""RePaint: training-free inpainting with any diffusion model (Lugmayr et al. 2022, "RePaint: Inpainting using
Denoising Diffusion Probabilistic Models", section 4 and Algorithm 1).

At every reverse step the known region is re-noised from the source image to the current noise level and pasted over
the sample: ``x_{t-1} = m * q_sample(x_0^known, t-1) + (1 - m) * p_sample(x_t, t)`` (eq. 8 with ``m`` = 1 on known
pixels). Because the known region is only imposed, not generated, the two halves are harmonised by **resampling**
(section 4.2): every ``jump_length`` steps the sample is diffused forward again by ``jump_length`` steps
(``x_{t+1} ~ q(x_{t+1}|x_t) = N(sqrt(1 - beta_{t+1}) x_t, beta_{t+1} I)``, one transition at a time) and denoised
once more, ``jump_n_sample - 1`` extra times per jump point. The schedule is :func:`jump_schedule`, the
``get_schedule_jump`` of the RePaint code (``jump_length``, ``jump_n_sample``; diffusers ``RePaintScheduler`` the
same with ``jump_n_sample`` counting all passes). With ``jump_n_sample = 1`` it is the plain descending loop.

``diffusion`` is normally respaced (`unclip_jax.diffusion.respace.respace`): the schedule runs over its indices
``S-1 .. 0`` and the forward jumps use its (respaced) betas, so a jump of one index is the exact forward transition
between the two strided noise levels. At index 0 the known part is the source itself (``abar_{-1} = 1``), so the
result equals the source on the known pixels (up to the sampler's clipping of the source to the model range).

The whole loop is ONE ``lax.scan`` over the static schedule (each entry a reverse step or a forward jump, chosen by
``lax.cond``, so a forward jump costs no network call). Randomness: ``key`` splits into (init, loop); x_T =
normal(init) unless given, and entry k of the schedule draws its noises from ``fold_in(loop, k)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.gaussian import DenoiseFn, GaussianDiffusion
from unclip_jax.diffusion.sampling import ddim_sample, p_sample

MASK_THRESHOLD = 0.5  # masks are binarised: values >= 0.5 are known pixels


def jump_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> np.ndarray:
    """The RePaint time schedule over indices ``num_steps - 1 .. 0`` with resampling jumps, ending with -1.

    RePaint's ``get_schedule_jump(t_T=num_steps, n_sample=1, jump_length, jump_n_sample)``: at every index ``j`` in
    ``range(0, num_steps - jump_length, jump_length)`` reached on the way down, jump back up ``jump_length`` indices
    (``jump_n_sample - 1`` times in all), one index at a time. Consecutive entries (a, b) are a reverse step from
    index a when b = a - 1 and a forward transition to b = a + 1 otherwise.

    Returns:
        int array starting at ``num_steps - 1`` and ending at -1; its length is
        ``num_steps + 1 + 2 * jump_length * (jump_n_sample - 1) * len(jump points)``.
    """
    if num_steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_schedule({num_steps}, {jump_length}, {jump_n_sample}): all must be >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, ts = num_steps, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    ts.append(-1)
    return np.asarray(ts, np.int32)


def binarize_mask(mask: jax.Array | np.ndarray) -> jax.Array:
    """``mask >= MASK_THRESHOLD`` as float32 (1 = known pixel, keep the source; 0 = inpaint)."""
    return (jnp.asarray(mask, jnp.float32) >= MASK_THRESHOLD).astype(jnp.float32)


def forward_jump(diffusion: GaussianDiffusion, x: jax.Array, t_next: jax.Array, noise: jax.Array) -> jax.Array:
    """One forward transition x_t -> x_{t+1} ~ q(x_{t+1}|x_t) = N(sqrt(1 - beta_{t+1}) x_t, beta_{t+1} I) with the
    (respaced) betas of ``diffusion`` (RePaint's ``undo``); ``t_next`` = t + 1 is a table index."""
    beta = jnp.asarray(diffusion.betas, jnp.float32)[t_next]
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise


def repaint_loop(
    diffusion: GaussianDiffusion,
    denoise_fn: DenoiseFn,
    x_known: jax.Array,
    mask: jax.Array,
    key: jax.Array,
    *,
    cond: Mapping[str, Any] | None = None,
    x_T: jax.Array | None = None,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    sampler: str = "ddpm",
    eta: float | jax.Array = 0.0,
    clip_known: float | None = 1.0,
) -> jax.Array:
    """Inpaints ``x_known`` where ``mask`` is 0 with RePaint (see module docstring); trace inside your own jit.

    Args:
        diffusion: (respaced) diffusion; its indices are the reverse steps.
        denoise_fn: ``denoise_fn(x_t, t, **cond)`` (e.g. a classifier-free-guided network).
        x_known: ``[B, H, W, C]`` source image in the model range ([-1, 1]); only its known pixels matter.
        mask: ``[B, H, W, 1]`` (or broadcastable) with 1 on known pixels; binarised at :data:`MASK_THRESHOLD`.
        key: PRNG key.
        cond: keyword arguments of ``denoise_fn``.
        x_T: optional initial noise like ``x_known``.
        jump_length, jump_n_sample: the resampling schedule (:func:`jump_schedule`; RePaint's defaults 10, 10).
        sampler: reverse step ``"ddpm"`` (ancestral, as RePaint) or ``"ddim"`` (with ``eta``).
        eta: DDIM eta.
        clip_known: the source is clipped to ``[-clip_known, clip_known]`` first (the range the sampler's output is
            clipped to); None keeps it as is.

    Returns:
        x_0 like ``x_known``: the source on the known pixels, a sample harmonised with it elsewhere.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"repaint_loop: sampler={sampler!r}, expected 'ddpm' or 'ddim'")
    x_known = jnp.asarray(x_known, jnp.float32)
    if clip_known is not None:
        x_known = jnp.clip(x_known, -clip_known, clip_known)
    m = jnp.broadcast_to(binarize_mask(mask), x_known.shape)
    init_key, loop_key = jax.random.split(key)
    x = jax.random.normal(init_key, x_known.shape, jnp.float32) if x_T is None else jnp.asarray(x_T, jnp.float32)
    ts = jump_schedule(diffusion.num_timesteps, jump_length, jump_n_sample)
    t_from, t_to = jnp.asarray(ts[:-1]), jnp.asarray(ts[1:])
    abar_prev = jnp.asarray(diffusion.alphas_cumprod_prev, jnp.float32)  # abar of index t-1 (1 at t = 0)

    def step(x: jax.Array, t: jax.Array, k_noise: jax.Array, k_known: jax.Array) -> jax.Array:
        noise = jax.random.normal(k_noise, x.shape, x.dtype)
        if sampler == "ddpm":
            unknown = p_sample(diffusion, denoise_fn, x, t, noise, cond)["sample"]
        else:
            unknown = ddim_sample(diffusion, denoise_fn, x, t, noise, cond, eta=eta)["sample"]
        a = abar_prev[t]
        known = jnp.sqrt(a) * x_known + jnp.sqrt(1.0 - a) * jax.random.normal(k_known, x.shape, x.dtype)
        return m * known + (1.0 - m) * unknown

    def forward(x: jax.Array, t_next: jax.Array, k_noise: jax.Array) -> jax.Array:
        return forward_jump(diffusion, x, t_next, jax.random.normal(k_noise, x.shape, x.dtype))

    def body(x, inputs):
        k, a, b = inputs
        k_noise, k_known = jax.random.split(jax.random.fold_in(loop_key, k))
        x = jax.lax.cond(b < a, lambda x: step(x, a, k_noise, k_known), lambda x: forward(x, b, k_noise), x)
        return x, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(len(ts) - 1, dtype=jnp.int32), t_from, t_to))
    return m * x_known + (1.0 - m) * x


def num_network_calls(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> int:
    """Network evaluations of :func:`repaint_loop` (its reverse steps; forward jumps are free)."""
    ts = jump_schedule(num_steps, jump_length, jump_n_sample)
    return int(np.sum(ts[1:] < ts[:-1]))
