"""GaussianDiffusion against closed forms computed independently in float64 numpy."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.respace import respace
from unclip_jax.diffusion.schedules import get_named_beta_schedule
from unclip_jax.diffusion.timesteps import (
    importance_sample,
    importance_weights,
    init_importance_state,
    sample_timesteps,
    update_importance_state,
)

T = 1000
BETAS = get_named_beta_schedule("cosine", T)


def _abar(betas, i):
    return float(np.prod(1.0 - betas[: i + 1]))


def _abar_prev(betas, i):
    return float(np.prod(1.0 - betas[:i]))


def test_q_sample_matches_formula_and_moments():
    d = GaussianDiffusion(BETAS)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 8)).astype(np.float32)
    noise = rng.normal(size=(5, 8)).astype(np.float32)
    t = np.array([0, 1, 300, 900, 999])
    got = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    a = np.array([_abar(BETAS, i) for i in t])[:, None]
    np.testing.assert_allclose(got, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
    mean, var, logvar = d.q_mean_variance(jnp.asarray(x0), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(mean), np.sqrt(a) * x0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(var)[:, :1], 1 - a, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logvar)[:, :1], np.log(1 - a), rtol=1e-5, atol=1e-6)
    # Empirical moments of q(x_t | x_0) at t=300 over many draws: within 5 standard errors.
    n, x_scalar, ti = 200_000, 0.7, 300
    samples = np.asarray(
        d.q_sample(jnp.full((n, 1), x_scalar), jnp.full((n,), ti), jax.random.normal(jax.random.key(1), (n, 1)))
    )
    at = _abar(BETAS, ti)
    assert abs(samples.mean() - math.sqrt(at) * x_scalar) < 5 * math.sqrt((1 - at) / n)
    assert abs(samples.var() - (1 - at)) < 5 * (1 - at) * math.sqrt(2 / n)


@pytest.mark.parametrize("spaced", [False, True])
def test_q_posterior_matches_bayes(spaced):
    d = GaussianDiffusion(BETAS)
    if spaced:
        d = respace(d, "unclip25")
    betas = d.betas
    rng = np.random.default_rng(1)
    idx = np.array([1, 2, 12, len(betas) - 1])
    x0 = rng.normal(size=(4, 6))
    xt = rng.normal(size=(4, 6))
    mean, var, logvar = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), idx)
    for row, i in enumerate(idx):
        # q(x_{t-1}|x_t, x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
        alpha, beta, ap = 1 - betas[i], betas[i], _abar_prev(betas, i)
        precision = alpha / beta + 1 / (1 - ap)
        bayes_var = 1 / precision
        bayes_mean = bayes_var * (math.sqrt(alpha) * xt[row] / beta + math.sqrt(ap) * x0[row] / (1 - ap))
        np.testing.assert_allclose(np.asarray(mean)[row], bayes_mean, rtol=1e-5, atol=1e-5)
        assert float(var[row, 0]) == pytest.approx(bayes_var, rel=1e-5)
        assert float(logvar[row, 0]) == pytest.approx(math.log(bayes_var), rel=1e-5, abs=1e-6)
    # Index 0: the posterior is the point mass at x_0; the clipped log-variance uses beta~_1.
    mean0, var0, logvar0 = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), 0)
    np.testing.assert_allclose(np.asarray(mean0), x0, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(var0) == 0.0)
    np.testing.assert_allclose(np.asarray(logvar0), math.log(d.posterior_variance[1]), rtol=1e-6)


def test_eps_xstart_v_round_trips():
    d = GaussianDiffusion(BETAS, model_mean_type="v")
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.uniform(-1, 1, size=(5, 4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(5, 4, 4, 3)), jnp.float32)
    t = jnp.array([0, 1, 250, 500, 900])
    xt = d.q_sample(x0, t, eps)
    np.testing.assert_allclose(d.predict_xstart_from_eps(xt, t, eps), x0, atol=2e-5)
    np.testing.assert_allclose(d.predict_eps_from_xstart(xt, t, d.predict_xstart_from_eps(xt, t, eps)), eps, atol=1e-3)
    np.testing.assert_allclose(
        d.predict_eps_from_xstart(xt, t[:1] + 300, x0 * 0 + d.predict_xstart_from_eps(xt, t[:1] + 300, eps)),
        eps,
        atol=1e-4,
    )
    v = d.predict_v(x0, t, eps)
    a = np.array([_abar(BETAS, int(i)) for i in t]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(v, np.sqrt(a) * np.asarray(eps) - np.sqrt(1 - a) * np.asarray(x0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.predict_xstart_from_v(xt, t, v), x0, atol=1e-5)
    np.testing.assert_allclose(d.predict_eps_from_v(xt, t, v), eps, atol=1e-5)


def _std_normal_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _discretized_ll(x, mean, log_scale):
    s = np.exp(log_scale)
    upper = np.where(x > 0.999, 1.0, _std_normal_cdf((x + 1 / 255 - mean) / s))
    lower = np.where(x < -0.999, 0.0, _std_normal_cdf((x - 1 / 255 - mean) / s))
    return np.log(upper - lower)


@pytest.fixture(scope="module")
def hybrid_case():
    d = GaussianDiffusion(BETAS, "epsilon", "learned_range", "hybrid")
    rng = np.random.default_rng(3)
    shape = (2, 4, 4, 3)
    x0 = np.round((rng.uniform(-1, 1, size=shape) + 1) * 127.5) / 127.5 - 1
    x0[0, 0, 0] = [-1.0, 1.0, 0.0]  # both edge bins
    noise = rng.normal(size=shape)
    out = np.concatenate([rng.normal(size=shape) * 0.5 + noise, rng.uniform(-1, 1, size=shape)], axis=-1)
    return d, x0, noise, out


def _model_gaussian(d_betas, i, x0, noise, out):
    """Model mean/log-variance of p(x_{t-1}|x_t) at index i, from scratch (unclipped x_0, learned range)."""
    a, ap, beta = _abar(d_betas, i), _abar_prev(d_betas, i), d_betas[i]
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    c = x0.shape[-1]
    eps, v = out[..., :c], out[..., c:]
    pred_x0 = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
    post_var = lambda j: d_betas[j] * (1 - _abar_prev(d_betas, j)) / (1 - _abar(d_betas, j))
    min_log = math.log(post_var(1) if i == 0 else post_var(i))
    frac = (v + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * min_log
    mean = (math.sqrt(ap) * beta / (1 - a)) * pred_x0 + ((1 - ap) * math.sqrt(1 - beta) / (1 - a)) * xt
    return xt, mean, log_var


@jax.jit(static_argnums=0)
def _losses(d, out, x0, t, noise):
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return d.training_losses(lambda x, tt: f32(out), f32(x0), t, f32(noise))


def test_vlb_term_at_t0_is_discretized_gaussian_nll(hybrid_case):
    d, x0, noise, out = hybrid_case
    t = jnp.zeros((2,), jnp.int32)
    terms = _losses(d, out, x0, t, noise)
    _, mean, log_var = _model_gaussian(BETAS, 0, x0, noise, out)
    expected = -_discretized_ll(x0, mean, 0.5 * log_var).reshape(2, -1).mean(axis=1) / math.log(2)
    np.testing.assert_allclose(np.asarray(terms["vb"]), expected, rtol=2e-4)
    mse = ((out[..., :3] - noise) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(terms["mse"]), mse, rtol=1e-5)
    # lambda * T = 0.001 * 1000 = 1: guided-diffusion's mse + vb.
    np.testing.assert_allclose(np.asarray(terms["loss"]), mse + expected, rtol=2e-4)


def test_vlb_term_at_t_gt_0_is_kl_to_bayes_posterior(hybrid_case):
    d, x0, noise, out = hybrid_case
    i = 500
    t = jnp.full((2,), i, jnp.int32)
    terms = _losses(d, out, x0, t, noise)
    xt, mean, log_var = _model_gaussian(BETAS, i, x0, noise, out)
    alpha, beta, ap = 1 - BETAS[i], BETAS[i], _abar_prev(BETAS, i)
    q_var = 1 / (alpha / beta + 1 / (1 - ap))
    q_mean = q_var * (math.sqrt(alpha) * xt / beta + math.sqrt(ap) * x0 / (1 - ap))
    kl = 0.5 * (log_var - math.log(q_var) + (q_var + (q_mean - mean) ** 2) / np.exp(log_var) - 1)
    expected = kl.reshape(2, -1).mean(axis=1) / math.log(2)
    np.testing.assert_allclose(np.asarray(terms["vb"]), expected, rtol=1e-3)


def test_hybrid_loss_stop_gradient_on_mean(hybrid_case):
    d, x0, noise, out = hybrid_case
    t = jnp.array([0, 400], jnp.int32)

    def loss(p):
        return d.training_losses(lambda x, tt: p, jnp.asarray(x0, jnp.float32), t, jnp.asarray(noise, jnp.float32))[
            "loss"
        ].sum()

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(out, jnp.float32)))
    n = np.prod(x0.shape[1:])
    # The mean channels get exactly the MSE gradient; the variance channels get the VLB gradient.
    np.testing.assert_allclose(g[..., :3], 2 * (out[..., :3] - noise) / n, rtol=1e-4, atol=1e-7)
    # (the learned range log beta~_t .. log beta_t is narrow at mid t, so that gradient is small there)
    assert np.all(np.abs(g[..., 3:]).reshape(2, -1).max(axis=1) > 1e-8)


@pytest.mark.parametrize("mean_type", ["epsilon", "x_start", "v"])
def test_mse_target_per_parameterisation(mean_type):
    d = GaussianDiffusion(BETAS, model_mean_type=mean_type, model_var_type="fixed_small")
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, size=(3, 8))
    noise = rng.normal(size=(3, 8))
    t = np.array([5, 500, 990])
    a = np.array([_abar(BETAS, i) for i in t])[:, None]
    target = {"epsilon": noise, "x_start": x0, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x0}[mean_type]
    exact = _losses(d, target, x0, jnp.asarray(t), noise)
    np.testing.assert_allclose(np.asarray(exact["mse"]), 0.0, atol=1e-10)
    off = _losses(d, target + 0.1, x0, jnp.asarray(t), noise)
    np.testing.assert_allclose(np.asarray(off["mse"]), 0.01, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(off["loss"]), np.asarray(off["mse"]))


def test_fixed_variances_and_clipping():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    out = jnp.asarray(rng.normal(size=(3, 5)) * 4, jnp.float32)
    t = jnp.array([0, 1, 700])
    post = lambda j: BETAS[j] * (1 - _abar_prev(BETAS, j)) / (1 - _abar(BETAS, j))
    expected_log = {
        "fixed_small": [math.log(post(1)), math.log(post(1)), math.log(post(700))],
        "fixed_large": [math.log(post(1)), math.log(BETAS[1]), math.log(BETAS[700])],
        "fixed_small_log": [math.log(1e-20), math.log(post(1)), math.log(post(700))],
    }
    for var_type, logs in expected_log.items():
        d = GaussianDiffusion(BETAS, "x_start", var_type, clip_denoised=1.5)
        res = d.p_mean_variance(lambda xx, tt: out, x, t)
        np.testing.assert_allclose(np.asarray(res["log_variance"])[:, 0], logs, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(res["pred_xstart"]), np.clip(np.asarray(out), -1.5, 1.5))
        # eps is consistent with the clipped x_0; model_eps with the raw output.
        np.testing.assert_allclose(d.predict_xstart_from_eps(x, t, res["eps"]), res["pred_xstart"], atol=1e-4)
        np.testing.assert_allclose(d.predict_xstart_from_eps(x, t, res["model_eps"]), out, atol=1e-4)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="model_var_type='learned_range'"):
        GaussianDiffusion(BETAS, loss_type="hybrid")
    with pytest.raises(ValueError, match="model_mean_type"):
        GaussianDiffusion(BETAS, model_mean_type="sample")
    d = GaussianDiffusion(BETAS, model_var_type="learned_range", loss_type="hybrid")
    with pytest.raises(ValueError, match="2\\*3 channels"):
        d.p_mean_variance(lambda x, t: x, jnp.zeros((1, 2, 2, 3)), jnp.array([1]))


def test_timestep_samplers():
    t, w = sample_timesteps(jax.random.key(0), 4096, 10)
    assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9 and np.all(np.asarray(w) == 1)
    state = init_importance_state(4, history_per_term=2)
    np.testing.assert_allclose(importance_weights(state), 0.25)  # uniform until every term is warm
    losses = jnp.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 9.0, 4.0])
    state = jax.jit(update_importance_state)(state, jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 3]), losses)
    np.testing.assert_array_equal(np.asarray(state.history[3]), [9.0, 4.0])  # oldest dropped, order kept
    rms = np.array([1.0, 2.0, 3.0, math.sqrt((81 + 16) / 2)])
    p = rms / rms.sum() * (1 - 0.001) + 0.001 / 4
    np.testing.assert_allclose(importance_weights(state), p, rtol=1e-6)
    ts, ws = jax.jit(importance_sample, static_argnums=2)(jax.random.key(1), state, 20_000)
    np.testing.assert_allclose(np.bincount(np.asarray(ts), minlength=4) / 20_000, p, atol=0.02)
    np.testing.assert_allclose(np.asarray(ws), 1 / (4 * p[np.asarray(ts)]), rtol=1e-5)


@pytest.mark.parametrize("mean_type", ["epsilon", "x_start", "v"])
def test_min_snr_gamma_weights_the_x0_error_by_min_snr(mean_type):
    # Hang et al. 2023 eq. 8: whatever the parameterisation, the weighted loss is min(SNR_t, gamma) ||x0_hat - x0||^2.
    gamma = 5.0
    d = GaussianDiffusion(BETAS, model_mean_type=mean_type, model_var_type="fixed_small", snr_gamma=gamma)
    rng = np.random.default_rng(7)
    x0 = rng.uniform(-1, 1, size=(4, 8))
    noise = rng.normal(size=(4, 8))
    out = rng.normal(size=(4, 8))
    t = np.array([3, 200, 600, 990])  # SNR above and below gamma
    a = np.array([_abar(BETAS, i) for i in t])[:, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    x0_hat = {
        "epsilon": (xt - np.sqrt(1 - a) * out) / np.sqrt(a),
        "x_start": out,
        "v": np.sqrt(a) * xt - np.sqrt(1 - a) * out,
    }[mean_type]
    snr = (a / (1 - a))[:, 0]
    assert snr.max() > gamma > snr.min()
    expected = np.minimum(snr, gamma) * ((x0_hat - x0) ** 2).mean(axis=1)
    got = _losses(d, out, x0, jnp.asarray(t), noise)
    np.testing.assert_allclose(np.asarray(got["loss"]), expected, rtol=1e-4)
    # "mse" stays the unweighted error of the parameterisation (what the logs compare across runs).
    unweighted = _losses(dataclasses.replace(d, snr_gamma=None), out, x0, jnp.asarray(t), noise)
    np.testing.assert_allclose(np.asarray(got["mse"]), np.asarray(unweighted["mse"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(unweighted["loss"]), np.asarray(unweighted["mse"]), rtol=1e-6)
    with pytest.raises(ValueError, match="snr_gamma"):
        GaussianDiffusion(BETAS, snr_gamma=0.0)
