"""The train step's optimisation pieces: gradient accumulation, the EMA update, the warm-up schedule, and
bf16 compute with float32 params.

A tiny deterministic regression task (one Dense layer, no RNG in the loss) makes one step with k microbatches
comparable to one step over the whole batch; each compile takes well under a second. bf16 uses the real prior
`test` variant (the tasks' dtype plumbing is what is tested there).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unclip_jax import parallel
from unclip_jax.layers import axes
from unclip_jax.train import loop, optim

B, D_IN, D_OUT = 8, 6, 4


class _Regression:
    """Task: mean squared error of a Dense layer (per-example mean over the outputs, mean over the batch)."""

    name = "regression"

    def __init__(self):
        self.module = nn.Dense(
            D_OUT,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (axes.EMBED, axes.MLP)),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (axes.MLP,)),
        )

    def init(self, rng, batch):
        return dict(self.module.init(rng, batch["x"]))

    def loss(self, params, batch, rng, extra):
        del rng, extra
        err = self.module.apply({"params": params}, batch["x"]) - batch["y"]
        loss = jnp.mean(err**2)
        return loss, {"loss": loss, "abs_err": jnp.mean(jnp.abs(err))}

    def sample(self, params, batch, rng, extra):
        return {}


def _optim_cfg(**kw) -> ml_collections.ConfigDict:
    cfg = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, schedule="constant")
    cfg.update(grad_clip_norm=0.0, grad_accum_steps=1, decay_steps=0, end_lr_factor=0.0)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(x=rng.normal(size=(B, D_IN)).astype(np.float32), y=rng.normal(size=(B, D_OUT)).astype(np.float32))


def _setup(optim_cfg, *, ema_decay=0.9, ema_warmup=False, grad_accum_steps=1, task=None, batch=None, total=100):
    """(initial host state, compiled train step, device batch) on one device."""
    task = task or _Regression()
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = parallel.logical_rules({"rules": "data"})
    tx, schedule = optim.make_optimizer(optim_cfg, total)
    batch = parallel.global_batch(_batch() if batch is None else batch, mesh)
    state, shardings, _ = loop.init_state(task, tx, jax.random.PRNGKey(0), batch, mesh, rules)
    step = loop.make_train_step(
        task,
        tx,
        schedule,
        base_rng=jax.random.PRNGKey(1),
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
        grad_accum_steps=grad_accum_steps,
    )
    compiled = loop.compile_train_step(step, state, batch, shardings, mesh, rules)
    return jax.device_get(state), compiled, batch, shardings


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- gradient accumulation
def test_microbatches_interleave_rows_and_name_the_field():
    x = np.arange(12).reshape(6, 2)
    micro = np.asarray(loop._microbatches({"x": jnp.asarray(x)}, 3)["x"])
    assert micro.shape == (3, 2, 2)
    for j in range(3):
        np.testing.assert_array_equal(micro[j], x[j::3])  # microbatch j = rows j, j+k, ...
    with pytest.raises(ValueError, match=r"config\.optim\.grad_accum_steps=4 does not divide the batch of 6"):
        loop._microbatches({"x": jnp.asarray(x)}, 4)


class _Recording(_Regression):
    """Records the microbatch shapes it is traced with and logs a uniform draw of its key (``train/u``)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def loss(self, params, batch, rng, extra):
        self.shapes.append(batch["x"].shape)
        loss, metrics = super().loss(params, batch, rng, extra)
        return loss, {**metrics, "u": jax.random.uniform(rng)}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_step_equals_the_full_batch_step(k):
    """Mean of the microbatch gradients / metrics == full-batch gradient / metrics, so the update is the same.

    Adam normalises the gradient, so the params alone would not see a missing 1/k; the logged gradient norm and
    loss do. The loss must really be called on k microbatches of B / k rows (else equality is trivial), each with
    its own key ``fold_in(step key, j)``.
    """
    cfg = _optim_cfg(grad_clip_norm=1.0, weight_decay=1e-2)  # clipping and decay see the accumulated gradient too
    full_task, accum_task = _Recording(), _Recording()
    state0, full, batch, _ = _setup(cfg, task=full_task)
    _, accum, _, _ = _setup(cfg, task=accum_task, grad_accum_steps=k)
    assert set(full_task.shapes) == {(B, D_IN)} and set(accum_task.shapes) == {(B // k, D_IN)}, accum_task.shapes
    ref_state, ref = full(jax.device_put(state0), batch)
    state, metrics = accum(jax.device_put(state0), batch)
    ref, metrics = jax.device_get(ref), jax.device_get(metrics)
    assert set(metrics) == set(ref)
    for key in ("train/loss", "train/abs_err", "train/grad_norm", "train/param_norm", "train/lr"):
        np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5, err_msg=key)
    step_key = jax.random.fold_in(jax.random.PRNGKey(1), 0)  # base_rng, step 0
    np.testing.assert_allclose(ref["train/u"], jax.random.uniform(step_key), rtol=1e-6)
    want_u = np.mean([jax.random.uniform(jax.random.fold_in(step_key, j)) for j in range(k)])
    np.testing.assert_allclose(metrics["train/u"], want_u, rtol=1e-6)
    # The gradient norm is well above the clip threshold and the step moved the params (no trivial equality).
    assert ref["train/grad_norm"] > 1.0
    for a, b, p0 in zip(_leaves(state.params), _leaves(ref_state.params), _leaves(state0.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert not np.allclose(a, p0)
    for a, b in zip(_leaves(state.opt_state), _leaves(ref_state.opt_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_after_one_and_two_steps(warmup):
    """ema <- d ema + (1 - d) params with d = decay, or min(decay, (1 + n) / (10 + n)) at step n with warm-up."""
    decay = 0.95
    state0, step, batch, _ = _setup(_optim_cfg(), ema_decay=decay, ema_warmup=warmup)
    for a, b in zip(_leaves(state0.ema_params), _leaves(state0.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the EMA starts as a copy of the params
    s1, _ = step(jax.device_put(state0), batch)
    s1 = jax.device_get(s1)
    d0 = min(decay, 1 / 10) if warmup else decay
    for e, p0, p1 in zip(_leaves(s1.ema_params), _leaves(state0.params), _leaves(s1.params), strict=True):
        np.testing.assert_allclose(e, d0 * p0 + (1 - d0) * p1, rtol=1e-6, atol=1e-7)
        assert not np.allclose(e, p1) and not np.allclose(e, p0)
    s2, _ = step(jax.device_put(s1), batch)
    s2 = jax.device_get(s2)
    d1 = min(decay, 2 / 11) if warmup else decay
    assert int(s2.step) == 2
    for e2, e1, p2 in zip(_leaves(s2.ema_params), _leaves(s1.ema_params), _leaves(s2.params), strict=True):
        np.testing.assert_allclose(e2, d1 * e1 + (1 - d1) * p2, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- learning-rate schedule
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedule_warms_up_linearly_then_decays(schedule):
    lr, warmup, total = 3e-3, 8, 40
    sched = optim.make_schedule(_optim_cfg(lr=lr, warmup_steps=warmup, schedule=schedule, end_lr_factor=0.1), total)
    for k in range(warmup + 1):
        np.testing.assert_allclose(float(sched(k)), lr * k / warmup, rtol=1e-6, atol=1e-12)
    end = {"constant": lr, "cosine": 0.1 * lr, "linear": 0.1 * lr}[schedule]
    np.testing.assert_allclose(float(sched(total)), end, rtol=1e-5)  # decay_steps 0 = total - warmup
    if schedule == "cosine":
        mid = warmup + (total - warmup) // 2
        np.testing.assert_allclose(float(sched(mid)), 0.1 * lr + 0.9 * lr * 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"config\.optim\.schedule='step'"):
        optim.make_schedule(_optim_cfg(schedule="step"), total)


def test_warmup_reaches_the_optimizer_and_the_lr_metric():
    """Step n uses lr * n / warmup: step 0 does not move the params; on a fixed batch the first Adam update (whose
    bias-corrected moments equal g and g^2) moves every parameter by exactly lr / warmup."""
    lr, warmup = 0.1, 4
    state0, step, batch, _ = _setup(_optim_cfg(lr=lr, warmup_steps=warmup, eps=1e-12))
    state, lrs = jax.device_put(state0), []
    params = [_leaves(state0.params)]
    for _ in range(warmup + 2):
        state, metrics = step(state, batch)
        lrs.append(float(metrics["train/lr"]))
        params.append(_leaves(jax.device_get(state.params)))
    np.testing.assert_allclose(lrs, [lr * min(k, warmup) / warmup for k in range(warmup + 2)], rtol=1e-6)
    for a, b in zip(params[0], params[1], strict=True):
        np.testing.assert_array_equal(a, b)  # lr 0 at step 0
    for a, b in zip(params[1], params[2], strict=True):
        np.testing.assert_allclose(np.abs(b - a), lr / warmup, rtol=1e-4)


# ----------------------------------------------------------------------------- bf16 compute, f32 params
def test_bfloat16_compute_keeps_float32_params_and_a_finite_loss():
    from tests.train import test_data as data
    from unclip_jax.train.tasks import make_task

    config = data.experiment("prior", **{"model.dtype": "bfloat16"})
    task = make_task(config)
    assert task.module.dtype == jnp.bfloat16 and task.module.param_dtype == jnp.float32
    local = data.first_batch(config)
    state0, step, batch, _ = _setup(config.optim, task=task, batch=local, total=config.total_steps)
    # The network really computes in bf16 (the task casts its output to f32 for the loss).
    cond = task._inputs(batch)
    out = jax.eval_shape(
        lambda p: task.module.apply(
            {"params": p, **state0.extra},
            batch["image_embeds"],
            jnp.zeros((len(batch["image_embeds"]),), jnp.int32),
            **cond,
            drop_text=jnp.zeros((len(batch["image_embeds"]),), bool),
        ),
        state0.params,
    )
    assert out.dtype == jnp.bfloat16, out.dtype
    state = jax.device_put(state0)
    for _ in range(2):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["train/loss"])), metrics
    state = jax.device_get(state)
    for tree in (state.params, state.ema_params):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert moments and {x.dtype for x in moments} == {np.dtype(np.float32)}
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(state0.params), _leaves(state.params), strict=True))
