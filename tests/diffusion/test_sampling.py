"""Samplers: parity with diffusers' UnCLIPScheduler / DDIMScheduler, DDIM inversion, guidance, determinism."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.guidance import classifier_free_guidance
from unclip_jax.diffusion.respace import respace
from unclip_jax.diffusion.sampling import (
    ddim_reverse_loop,
    ddim_sample,
    ddim_sample_loop,
    p_sample,
    p_sample_loop,
)
from unclip_jax.diffusion.schedules import get_named_beta_schedule

BETAS = get_named_beta_schedule("cosine", 1000)
STEPS = 25

# Karlo's scheduler configurations (kakaobrain/karlo-v1-alpha, see shared/reference/karlo-diffusers-layout.md).
CONFIGS = {
    "prior": dict(
        ours=dict(model_mean_type="x_start", model_var_type="fixed_small_log", clip_denoised=5.0),
        theirs=dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
        shape=(3, 16),
    ),
    "decoder": dict(
        ours=dict(model_mean_type="epsilon", model_var_type="learned_range", clip_denoised=1.0),
        theirs=dict(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0),
        shape=(2, 4, 4, 3),
    ),
}


def fake_prior(x, t):
    """A fixed stand-in for the prior: predicts x_0, sometimes beyond the 5.0 clip range."""
    tt = t.astype(jnp.float32)[:, None] / 1000.0
    return 8.0 * jnp.tanh(0.2 * x + tt - 0.3)


def fake_decoder(x, t):
    """A fixed stand-in for the decoder: eps then learned-range variance values in (-1, 1) on the last axis."""
    tt = (t.astype(jnp.float32) / 1000.0).reshape(-1, 1, 1, 1)
    eps = 1.1 * jnp.tanh(0.9 * x + 0.3 * tt) + 0.05 * jnp.roll(x, 1, axis=-1)
    var = jnp.tanh(0.5 * x - tt + 0.2)
    return jnp.concatenate([eps, var], axis=-1)


FAKES = {"prior": fake_prior, "decoder": fake_decoder}


def _to_torch(a, torch, dtype=np.float64):
    a = np.asarray(a, dtype=dtype)
    if a.ndim == 4:  # NHWC -> NCHW
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a))


def _from_torch(a):
    a = a.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


@functools.cache
def _diffusion(name: str, spacing: str = f"unclip{STEPS}", **overrides):
    kwargs = dict(CONFIGS[name]["ours"]) if name in CONFIGS else {}
    kwargs.update(overrides)
    return respace(GaussianDiffusion(BETAS, **kwargs), spacing)


@functools.cache
def _p_step(name: str):
    d = _diffusion(name)
    return jax.jit(lambda out, x, k, noise: p_sample(d, lambda *_: out, x, k, noise))


def _unclip_scheduler(torch, float64=True, **kwargs):
    """diffusers' UnCLIPScheduler, by default with its tables recomputed in float64.

    Stock diffusers keeps betas / alphas_cumprod in float32, where ``1 - alphas_cumprod[0]`` (4.1e-5) and the
    recomputed ``alpha = 1 - beta`` at t=999 (2.5e-9) lose most of their digits: its last step scales x_0 by
    0.99947 instead of 1. The float64 tables are the same schedule (checked against the float32 ones), so the
    comparison tests the algorithm to 1e-5 rather than float32 cancellation.
    """
    from diffusers import UnCLIPScheduler

    sched = UnCLIPScheduler(**kwargs)
    sched.set_timesteps(STEPS)
    if float64:
        np.testing.assert_allclose(sched.betas.numpy(), BETAS, rtol=1e-6)
        sched.betas = torch.from_numpy(BETAS.copy())
        sched.alphas = 1.0 - sched.betas
        sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


class _NoiseFeed:
    """Replaces diffusers' randn_tensor with given noise, in order, and counts the calls."""

    def __init__(self, noises, torch):
        self.noises = list(noises)
        self.torch = torch
        self.calls = 0

    def __call__(self, shape, **_):
        out = _to_torch(self.noises[self.calls], self.torch)
        assert tuple(out.shape) == tuple(shape)
        self.calls += 1
        return out


@pytest.mark.torch
@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_unclip_scheduler_single_step_parity(torch_threads, monkeypatch, name):
    from diffusers.schedulers import scheduling_unclip

    torch = torch_threads
    cfg = CONFIGS[name]
    sched = _unclip_scheduler(torch, **cfg["theirs"])
    stock = _unclip_scheduler(torch, float64=False, **cfg["theirs"])
    timesteps = sched.timesteps.tolist()
    stock_worst = 0.0
    shape = cfg["shape"]
    out_shape = shape[:-1] + (2 * shape[-1],) if name == "decoder" else shape
    rng = np.random.default_rng(0)
    worst = 0.0
    for k in (0, 1, 12, STEPS - 1):  # table index: 0 is the last step (t=0), STEPS-1 the first (t=999)
        x = rng.normal(size=shape).astype(np.float32)
        out = rng.normal(size=out_shape).astype(np.float32) * 3
        if name == "decoder":
            out[..., shape[-1] :] = rng.uniform(-1, 1, size=shape)
        noise = rng.normal(size=shape).astype(np.float32)
        ours = _p_step(name)(jnp.asarray(out), jnp.asarray(x), k, jnp.asarray(noise))
        feed = _NoiseFeed([noise, noise], torch)
        monkeypatch.setattr(scheduling_unclip, "randn_tensor", feed)
        i = STEPS - 1 - k
        prev = timesteps[i + 1] if i + 1 < STEPS else None
        theirs = sched.step(_to_torch(out, torch), timesteps[i], _to_torch(x, torch), prev_timestep=prev)
        f32 = lambda a: _to_torch(a, torch, np.float32)
        theirs32 = stock.step(f32(out), timesteps[i], f32(x), prev_timestep=prev).prev_sample
        stock_worst = max(stock_worst, float(np.max(np.abs(np.asarray(ours["sample"]) - _from_torch(theirs32)))))
        assert feed.calls == (2 if k > 0 else 0)
        for key, ref in (("sample", theirs.prev_sample), ("pred_xstart", theirs.pred_original_sample)):
            diff = float(np.max(np.abs(np.asarray(ours[key]) - _from_torch(ref))))
            assert diff < 1e-5, (name, k, key, diff)
            worst = max(worst, diff)
    print(f"UnCLIPScheduler.step {name}: max abs diff {worst:.2e} (stock float32 diffusers: {stock_worst:.2e})")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_unclip_whole_loop_matches_step_for_step(torch_threads, monkeypatch, name):
    from diffusers.schedulers import scheduling_unclip

    torch = torch_threads
    cfg = CONFIGS[name]
    fake = FAKES[name]
    d = _diffusion(name)
    x_T = jax.random.normal(jax.random.key(7), cfg["shape"])
    loop = jax.jit(lambda key, x_T: p_sample_loop(d, fake, None, key, x_T=x_T, return_intermediates=True))
    x0, inter = loop(jax.random.key(3), x_T)

    sched = _unclip_scheduler(torch, **cfg["theirs"])
    timesteps = sched.timesteps.tolist()
    np.testing.assert_array_equal(np.asarray(inter["t"]), timesteps)
    feed = _NoiseFeed(np.asarray(inter["noise"]), torch)
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", feed)
    x = _to_torch(x_T, torch)
    fake = jax.jit(fake)
    diffs = []
    for i, t in enumerate(timesteps):
        out = fake(jnp.asarray(_from_torch(x), jnp.float32), jnp.full((x.shape[0],), t, jnp.int32))
        prev = timesteps[i + 1] if i + 1 < STEPS else None
        x = sched.step(_to_torch(out, torch), t, x, prev_timestep=prev).prev_sample
        diffs.append(float(np.max(np.abs(np.asarray(inter["x"][i]) - _from_torch(x)))))
    assert feed.calls == STEPS - 1
    assert max(diffs) < 1e-5, diffs
    clip = cfg["theirs"]["clip_sample_range"]
    assert np.any(np.abs(np.asarray(inter["pred_xstart"])) == clip)  # the clipping branch was exercised
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(inter["x"][-1]))
    print(f"UnCLIP loop {name}: per-step max abs diff {max(diffs):.2e}")


@pytest.mark.torch
@pytest.mark.parametrize(
    "mean_type,prediction_type", [("epsilon", "epsilon"), ("v", "v_prediction"), ("x_start", "sample")]
)
def test_ddim_scheduler_step_parity(torch_threads, mean_type, prediction_type):
    from diffusers import DDIMScheduler

    torch = torch_threads
    sched = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True, prediction_type=prediction_type
    )
    sched.set_timesteps(50)
    d = _diffusion("ddim", "ddim50", model_mean_type=mean_type, model_var_type="fixed_small", clip_denoised=1.0)
    np.testing.assert_array_equal(sorted(sched.timesteps.tolist()), d.timestep_map)
    steps = {
        flag: jax.jit(lambda out, x, k, noise, eta, f=flag: ddim_sample(d, lambda *_: out, x, k, noise, None, eta, f))
        for flag in (False, True)
    }
    rng = np.random.default_rng(1)
    shape = (2, 4, 4, 3)
    worst = 0.0
    for k in (0, 25, 49):
        x = rng.normal(size=shape).astype(np.float32)
        out = rng.normal(size=shape).astype(np.float32)
        noise = rng.normal(size=shape).astype(np.float32)  # the same noise for eta 0 and 1
        for eta in (0.0, 1.0):
            for flag in (False, True):
                ours = steps[flag](jnp.asarray(out), jnp.asarray(x), k, jnp.asarray(noise), eta)
                f32 = lambda a: _to_torch(a, torch, np.float32)  # stock float32 diffusers
                theirs = sched.step(
                    f32(out),
                    d.timestep_map[k],
                    f32(x),
                    eta=eta,
                    use_clipped_model_output=flag,
                    variance_noise=f32(noise),
                )
                diff = float(np.max(np.abs(np.asarray(ours["sample"]) - _from_torch(theirs.prev_sample))))
                assert diff < 1e-5, (k, eta, flag, diff)
                worst = max(worst, diff)
    print(f"DDIMScheduler.step {prediction_type}: max abs diff {worst:.2e}")


def gaussian_data_eps(x, t):
    """The exact E[eps | x_t] for data ~ N(0.1, 0.5^2) elementwise: a fixed, smooth, realistic denoiser."""
    a = jnp.asarray(np.cumprod(1.0 - BETAS), jnp.float32)[t].reshape(-1, 1, 1, 1)
    return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * 0.1) / (0.25 * a + 1.0 - a)


def weak_eps(x, t):
    """A denoiser whose eps hardly depends on x (nearly constant along the path, as plain DDIM inversion assumes)."""
    tt = (t.astype(jnp.float32) / 1000.0).reshape(-1, 1, 1, 1)
    pattern = jnp.sin(jnp.arange(x.shape[1] * x.shape[2] * x.shape[3], dtype=jnp.float32)).reshape(x.shape[1:])
    return pattern * (1.0 + 0.1 * tt) + 5e-4 * jnp.tanh(x)


@functools.cache
def _roundtrip_fn(iters: int):
    """jit(image, w -> (x_T, reconstruction)) with denoiser w * gaussian_data_eps + (1 - w) * weak_eps."""
    d = _diffusion("inv", "ddim50", model_mean_type="epsilon", model_var_type="fixed_small", clip_denoised=None)

    @jax.jit
    def run(image, w):
        fn = lambda x, t: w * gaussian_data_eps(x, t) + (1.0 - w) * weak_eps(x, t)
        x_T = ddim_reverse_loop(d, fn, image, fixed_point_iters=iters)
        return x_T, ddim_sample_loop(d, fn, None, jax.random.key(1), x_T=x_T, eta=0.0)

    return run


def _roundtrip(w, iters):
    image = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    x_T, rec = _roundtrip_fn(iters)(image, jnp.float32(w))
    assert float(jnp.max(jnp.abs(x_T - image))) > 0.3  # x_T really is a different (noised) point
    return float(jnp.max(jnp.abs(rec - image)))


def test_ddim_inversion_reconstructs():
    """Plain DDIM inversion (eta 0) then DDIM sampling (eta 0) at 50 steps returns the image."""
    err = _roundtrip(0.0, 0)
    assert err < 1e-3, err
    print(f"DDIM inversion -> sampling at 50 steps: max abs reconstruction error {err:.2e}")


def test_ddim_inversion_fixed_point_iterations():
    """Plain inversion has a first-order error where eps varies along the path; fixed-point steps remove it."""
    plain, iterated = _roundtrip(1.0, 0), _roundtrip(1.0, 5)
    assert plain > 1e-2 and iterated < 1e-3, (plain, iterated)
    print(f"DDIM inversion, Gaussian-data denoiser: plain {plain:.2e}, 5 fixed-point iterations {iterated:.2e}")


def test_sampling_is_deterministic_and_one_loop():
    d = _diffusion("decoder")
    traced = []

    def counting_fake(x, t):
        traced.append(1)
        return fake_decoder(x, t)

    loop = jax.jit(lambda key: p_sample_loop(d, counting_fake, (2, 4, 4, 3), key))
    a, b, c = loop(jax.random.key(0)), loop(jax.random.key(0)), loop(jax.random.key(1))
    assert len(traced) == 1  # the network is traced once: one lax.scan over the 25 steps
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-2
    ddim = jax.jit(lambda key: ddim_sample_loop(d, fake_decoder, (2, 4, 4, 3), key, eta=1.0))
    np.testing.assert_array_equal(np.asarray(ddim(jax.random.key(2))), np.asarray(ddim(jax.random.key(2))))


def _cond_fn(x, t, emb, flag):
    """Learned-variance output whose both halves depend on the condition ``emb`` [B, C]."""
    assert flag == "ok"
    e = emb[:, None, None, :]
    tt = (t.astype(jnp.float32) / 1000.0).reshape(-1, 1, 1, 1)
    return jnp.concatenate([x * e + tt, jnp.tanh(x + e)], axis=-1)


def test_classifier_free_guidance_identities():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    t = jnp.array([10, 500], jnp.int32)
    cond = dict(emb=jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), flag="ok")
    uncond = dict(emb=jnp.zeros((2, 3), jnp.float32), flag="ok")
    # References compiled like the wrapper (XLA may fuse x * e + t into an FMA under jit).
    c_out = jax.jit(_cond_fn, static_argnames="flag")(x, t, **cond)
    u_out = jax.jit(_cond_fn, static_argnames="flag")(x, t, **uncond)
    assert float(jnp.max(jnp.abs(c_out - u_out))) > 0.1
    for batched in (True, False):
        guide = lambda s, b=batched: jax.jit(classifier_free_guidance(_cond_fn, s, cond, uncond, batched=b))(x, t)
        # Traced scales exercise the formula; Python 1 / 0 call one branch only. Both are exact.
        for one in (1, jnp.float32(1.0)):
            np.testing.assert_array_equal(np.asarray(guide(one)), np.asarray(c_out))
        for zero in (0, jnp.float32(0.0)):
            g0 = np.asarray(guide(zero))
            np.testing.assert_array_equal(g0[..., :3], np.asarray(u_out[..., :3]))
            if not isinstance(zero, int):  # the guided wrapper keeps the conditional variance channels
                np.testing.assert_array_equal(g0[..., 3:], np.asarray(c_out[..., 3:]))
        g4 = np.asarray(guide(4.0))
        np.testing.assert_allclose(g4[..., :3], u_out[..., :3] + 4.0 * (c_out[..., :3] - u_out[..., :3]), rtol=1e-6)
        np.testing.assert_array_equal(g4[..., 3:], np.asarray(c_out[..., 3:]))
        per_example = np.asarray(guide(jnp.array([0.0, 1.0])))
        np.testing.assert_array_equal(per_example[0, ..., :3], np.asarray(u_out[0, ..., :3]))
        np.testing.assert_array_equal(per_example[1], np.asarray(c_out[1]))
    # Guidance of every channel for outputs shaped like x (prior embeddings [B, D]).
    prior_fn = lambda z, tt, emb: z * emb
    z = jnp.ones((2, 3))
    g = classifier_free_guidance(prior_fn, 2.0, dict(emb=cond["emb"]), dict(emb=uncond["emb"]))(z, t)
    np.testing.assert_allclose(np.asarray(g), 2.0 * np.asarray(cond["emb"]), rtol=1e-6)
    with pytest.raises(ValueError, match="keys"):
        classifier_free_guidance(prior_fn, 2.0, dict(emb=z), dict(other=z))(z, t)
