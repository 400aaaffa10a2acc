"""RePaint (diffusion/repaint.py): the jump schedule is RePaint's ``get_schedule_jump`` (transcribed), the known
region is the source exactly, an oracle denoiser's unknown region converges to its x_0 (closed form), the forward
jump is the strided forward transition, the mask threshold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.repaint import (
    MASK_THRESHOLD,
    binarize_mask,
    forward_jump,
    jump_schedule,
    num_network_calls,
    repaint_loop,
)
from unclip_jax.diffusion.respace import respace
from unclip_jax.diffusion.schedules import get_named_beta_schedule


def get_schedule_jump(t_T, n_sample, jump_length, jump_n_sample, jump2_length=1, jump2_n_sample=1,
                      start_resampling=100000000):  # fmt: skip
    """andreas128/RePaint ``guided_diffusion/scheduler.py:get_schedule_jump`` (without the plotting / collapse)."""
    jumps = {}
    for j in range(0, t_T - jump_length, jump_length):
        jumps[j] = jump_n_sample - 1
    jumps2 = {}
    for j in range(0, t_T - jump2_length, jump2_length):
        jumps2[j] = jump2_n_sample - 1
    t = t_T
    ts = []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if t + 1 < t_T - 1 and t <= start_resampling:
            for _ in range(n_sample - 1):
                t = t + 1
                ts.append(t)
                if t >= 0:
                    t = t - 1
                    ts.append(t)
        if jumps2.get(t, 0) > 0 and t <= start_resampling - jump2_length:
            jumps2[t] = jumps2[t] - 1
            for _ in range(jump2_length):
                t = t + 1
                ts.append(t)
        if jumps.get(t, 0) > 0 and t <= start_resampling - jump_length:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize("n, jl, jn", [(250, 10, 10), (25, 5, 3), (20, 10, 2), (8, 3, 1), (7, 10, 10), (1, 1, 1)])
def test_jump_schedule_is_repaints(n, jl, jn):
    ts = jump_schedule(n, jl, jn)
    assert ts.tolist() == get_schedule_jump(n, 1, jl, jn)
    assert ts[0] == n - 1 and ts[-1] == -1 and set(np.abs(np.diff(ts)).tolist()) <= {1}
    points = len(range(0, n - jl, jl))
    assert len(ts) == n + 1 + 2 * jl * (jn - 1) * points
    assert num_network_calls(n, jl, jn) == n + jl * (jn - 1) * points


def _diffusion(steps: int = 20) -> GaussianDiffusion:
    d = GaussianDiffusion(
        get_named_beta_schedule("cosine", 1000), model_mean_type="epsilon", model_var_type="fixed_small_log"
    )
    return respace(d, str(steps))


def _oracle(d: GaussianDiffusion, x0: jax.Array):
    """The ideal eps-denoiser of a data distribution that is the single image ``x0``."""

    def denoise(x_t, t_model):
        t = jnp.searchsorted(jnp.asarray(d.timestep_map_array), t_model)
        abar = jnp.asarray(d.alphas_cumprod, jnp.float32)[t][:, None, None, None]
        return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)

    return denoise


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_known_region_is_the_source_and_an_oracle_fills_the_rest(sampler):
    d = _diffusion(20)
    rng = np.random.default_rng(0)
    source = jnp.asarray(rng.uniform(-1.2, 1.2, (2, 8, 8, 3)), jnp.float32)  # partly outside the clip range
    target = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 8, 8, 3)), jnp.float32)
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[:, :4] = 1.0
    mask[1, :, :2] = 0.7  # >= 0.5: known
    out = jax.jit(
        lambda key: repaint_loop(
            d, _oracle(d, target), source, jnp.asarray(mask), key, jump_length=5, jump_n_sample=3, sampler=sampler
        )
    )(jax.random.PRNGKey(0))
    known = np.broadcast_to(mask >= MASK_THRESHOLD, out.shape)
    np.testing.assert_array_equal(np.asarray(out)[known], np.clip(np.asarray(source), -1, 1)[known])
    np.testing.assert_allclose(np.asarray(out)[~known], np.asarray(target)[~known], atol=1e-4)


def test_forward_jump_is_the_strided_forward_transition():
    """A jump from index t to t+1 of a respaced diffusion is q(x_{t+1} | x_t): from samples of q(x_t | x_0) it gives
    samples of q(x_{t+1} | x_0) (mean sqrt(abar_{t+1}) x_0, variance 1 - abar_{t+1}); abar_t (1 - beta_{t+1}) =
    abar_{t+1} holds in the table."""
    d = _diffusion(10)
    abar, betas = np.asarray(d.alphas_cumprod), np.asarray(d.betas)
    np.testing.assert_allclose(abar[:-1] * (1.0 - betas[1:]), abar[1:], rtol=1e-10)
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    n, x0 = 200_000, 0.6
    for t in (0, 4, 8):
        x_t = d.q_sample(jnp.full((n, 1), x0), jnp.full((n,), t), jax.random.normal(k1, (n, 1)))
        x_next = np.asarray(forward_jump(d, x_t, jnp.asarray(t + 1), jax.random.normal(k2, (n, 1))))
        assert abs(x_next.mean() - np.sqrt(abar[t + 1]) * x0) < 0.01
        assert abs(x_next.var() - (1.0 - abar[t + 1])) < 0.01


def test_mask_threshold():
    m = binarize_mask(np.asarray([0.0, 0.49, 0.5, 0.51, 1.0]))
    assert np.asarray(m).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="sampler"):
        repaint_loop(_diffusion(2), lambda x, t: x, jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1)),
                     jax.random.PRNGKey(0), sampler="euler")  # fmt: skip
