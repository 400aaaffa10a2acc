"""Beta schedules against their closed forms; respacing against its definition and diffusers' spacings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.respace import respace, space_timesteps
from unclip_jax.diffusion.schedules import get_named_beta_schedule


def test_cosine_alphas_cumprod_matches_analytic():
    T = 1000
    betas = get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    abar = np.cumprod(1.0 - betas)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    analytic = np.array([f(i + 1) / f(0) for i in range(T)])
    # Improved DDPM eq. 17: alphas_cumprod[i] = f(i+1)/f(0) wherever the 0.999 cap is inactive (all but the last).
    np.testing.assert_allclose(abar[:-1], analytic[:-1], rtol=1e-10, atol=1e-15)
    assert betas[-1] == 0.999 and np.all(betas[:-1] < 0.999)
    assert abar[-1] == pytest.approx(analytic[-2] * 0.001, rel=1e-10)


def test_linear_schedule_scaled_endpoints():
    for T in (1000, 250):
        betas = get_named_beta_schedule("linear", T)
        assert betas[0] == pytest.approx(1e-4 * 1000 / T) and betas[-1] == pytest.approx(0.02 * 1000 / T)
        np.testing.assert_allclose(np.diff(betas), (betas[-1] - betas[0]) / (T - 1), rtol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim50") == tuple(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim27") == tuple(range(0, 1000, 38))
    assert space_timesteps(100, "10") == tuple(round(i * 99 / 9) for i in range(10))
    # Section counts: 3 sections of 334/333/333 steps strided by their own counts.
    steps = space_timesteps(1000, "10,10,5")
    assert len(steps) == 25
    assert sum(s < 334 for s in steps) == 10 and sum(334 <= s < 667 for s in steps) == 10
    assert {0, 333, 334, 666, 667, 999} <= set(steps)
    assert space_timesteps(1000, [999, 5, 0, 5]) == (0, 5, 999)
    assert space_timesteps(10, lambda n: range(0, n, 3)) == (0, 3, 6, 9)
    with pytest.raises(ValueError, match="outside"):
        space_timesteps(10, [10])
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


@pytest.mark.torch
@pytest.mark.parametrize("n", [2, 7, 25, 64])
def test_unclip_spacing_matches_diffusers(torch_threads, n):
    from diffusers import UnCLIPScheduler

    sched = UnCLIPScheduler()
    sched.set_timesteps(n)
    assert space_timesteps(1000, f"unclip{n}") == tuple(sorted(sched.timesteps.tolist()))
    assert space_timesteps(1000, f"unclip{n}")[-1] == 999


def test_respace_keeps_alphas_cumprod_and_maps_timesteps():
    base = GaussianDiffusion(get_named_beta_schedule("cosine", 1000), clip_denoised=None)
    sp = respace(base, "unclip25")
    kept = np.array(sp.timestep_map)
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-7)
    # UnCLIPScheduler's recomputed beta: 1 - abar_t / abar_prev, with beta_0 of the base at index 0.
    assert sp.betas[0] == pytest.approx(base.betas[0], rel=1e-12)
    np.testing.assert_allclose(sp.betas[1:], 1 - base.alphas_cumprod[kept[1:]] / base.alphas_cumprod[kept[:-1]])
    # Respacing a respaced diffusion still maps to original timesteps.
    sp2 = respace(sp, [0, 3, 24])
    assert sp2.timestep_map == (0, sp.timestep_map[3], 999)
    np.testing.assert_allclose(sp2.alphas_cumprod, base.alphas_cumprod[list(sp2.timestep_map)], rtol=1e-7)
    # Settings are carried over and value equality / hashing holds.
    assert sp.clip_denoised is None and sp == respace(base, "unclip25") and hash(sp) == hash(respace(base, "unclip25"))
    assert sp != base
