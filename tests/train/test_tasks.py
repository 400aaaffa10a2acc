"""The tasks: each `test` variant trains (two real steps stay finite and change the params; a 50-step run
on a fixed batch lowers the loss), the upsampler's periodic preview is a PNG grid, the classifier-free-guidance
dropouts have the paper's rates (decoder: image embedding 10% and caption 50%, independently; prior and AR prior:
caption 10%), and the CLIP loss is the symmetric cross-entropy with a learned temperature.

Speed: each stage's 1-device run (init, compile, 50 steps) is computed once per process by :func:`_run` and shared
by that stage's tests (one xdist group per stage). Its init, train step and preview are compiled with LLVM at -O0
(:data:`FAST`: faster compiles, slower steps, a win for 50 steps of a batch of 4). The dropout tests use a stub
network (eager, no compile) so that batches of 20 000 rows check the rates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax import parallel
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import pca_codec
from unclip_jax.train import loop, optim
from unclip_jax.train import metrics as metrics_lib
from unclip_jax.train.config_loading import load_experiment
from unclip_jax.train.tasks import base, make_task
from unclip_jax.train.tasks.clip import ClipTask
from unclip_jax.train.tasks.decoder import DecoderTask
from unclip_jax.train.tasks.prior import PriorTask

STEPS = 50  # a 50-step run on a fixed batch lowers the loss
BATCH = 4  # the `test` configs use 8; 4 halves the step time and still trains every stage
FAST = {"xla_backend_optimization_level": 0}  # per-compile XLA option: LLVM -O0 (test speed only)
STAGES = ("prior", "decoder", "upsampler", "clip")


def _group(stage: str):
    """The tests of one stage share its cached run: keep them on one xdist worker."""
    return pytest.mark.xdist_group(f"train_tasks_{stage}")


@dataclasses.dataclass
class Run:
    config: object
    task: object
    mesh: object
    rules: object
    batch: dict
    base_rng: jax.Array
    before: object  # host params after init
    after_two: object  # host params after 2 steps
    state: object  # device state after STEPS steps
    losses: list


@functools.cache
def _run(stage: str) -> Run:
    """STEPS train steps of the stage's `test` variant on its first real batch (BATCH rows), on one device.

    The step counter is reset to 0 before every step: the same timesteps / noise / dropouts every time, so the
    losses are comparable. ``loop.init_state`` / ``loop.compile_train_step`` with the :data:`FAST` compiler option.
    """
    config = data.experiment(stage, batch_size=BATCH)
    task = make_task(config)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = parallel.logical_rules(config.mesh)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = parallel.global_batch(data.first_batch(config), mesh)
    rng = jax.random.PRNGKey(0)
    state, shardings, _ = loop.init_state(task, tx, rng, batch, mesh, rules, compiler_options=FAST)
    base_rng = jax.random.PRNGKey(1)
    step = loop.make_train_step(task, tx, schedule, base_rng=base_rng, ema_decay=0.9)
    compiled = loop.compile_train_step(step, state, batch, shardings, mesh, rules, compiler_options=FAST)
    before = jax.device_get(state.params)
    losses, after_two = [], None
    for i in range(STEPS):
        state, metrics = compiled(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["train/loss"]))
        if i == 1:
            after_two = jax.device_get(state.params)
    return Run(config, task, mesh, rules, batch, base_rng, before, after_two, state, losses)


def _changed(a, b) -> list[bool]:
    return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]


@pytest.mark.parametrize("stage", [pytest.param(s, marks=_group(s)) for s in STAGES])
def test_task_trains_on_a_fixed_batch(stage):
    run = _run(stage)
    print(stage, run.losses)
    # Two real steps: nothing NaN, the params moved.
    assert np.all(np.isfinite(run.losses[:2])), run.losses[:2]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(run.after_two))
    assert any(_changed(run.before, run.after_two))
    # 50 steps: still finite, (almost) every parameter moved, the loss fell.
    assert np.all(np.isfinite(run.losses))
    # Zero-initialised output convs (ADM) hold back the layers behind them for a few steps; by now all moved.
    changed = _changed(run.before, jax.device_get(run.state.params))
    assert sum(changed) > 0.9 * len(changed), f"{sum(changed)}/{len(changed)} params changed"
    assert run.losses[-1] < 0.8 * run.losses[0], (stage, run.losses)


# ----------------------------------------------------------------------------- previews (loop._preview)
@_group("upsampler")
def test_upsampler_preview_writes_a_png_grid(tmp_path):
    """``loop._preview`` (what ``preview_every`` runs) on the trained upsampler: a PNG grid of 3 rows of n tiles."""
    from PIL import Image

    run = _run("upsampler")
    n = int(run.config.preview_count)
    assert n <= BATCH
    preview_batch = jax.tree.map(lambda x: x[:n], run.batch)
    with parallel.mesh_context(run.mesh, run.rules):
        preview_fn = (
            jax.jit(lambda p, e, b, r: run.task.sample(p, b, r, e), out_shardings=parallel.replicated(run.mesh))
            .lower(run.state.ema_params, run.state.extra, preview_batch, run.base_rng)
            .compile(FAST)
        )
    workdir = str(tmp_path)
    writer = metrics_lib.create_writer(workdir, True)
    step = 7
    loop._preview(preview_fn, run.state, preview_batch, run.base_rng, step, workdir, writer, True)
    writer.flush()
    path = os.path.join(workdir, "previews", f"step_{step:07d}.png")
    assert os.path.exists(path), os.listdir(workdir)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        grid = np.asarray(im.convert("RGB"), np.float32) / 255.0
    # [upsampled low-res | sample | real] x n tiles of H x W on a near-square grid (metrics.save_image_grid).
    h, w = run.batch["image"].shape[1:3]
    rows = int(math.floor(math.sqrt(3 * n)))
    cols = math.ceil(3 * n / rows)
    assert grid.shape == (rows * h, cols * w, 3), (grid.shape, rows, cols)
    # Tile 2n is the first real image: the grid holds the batch, not just a blank canvas.
    r, c = divmod(2 * n, cols)
    real = np.asarray(base.to_unit_range(preview_batch["image"][0]))
    np.testing.assert_allclose(grid[r * h : (r + 1) * h, c * w : (c + 1) * w], real, atol=1.0 / 255 + 1e-6)
    assert grid.std() > 0.01


# ----------------------------------------------------------------------------- classifier-free-guidance dropouts
_SEEN: list[dict] = []  # what the stub network was called with (eager calls only)


class _StubNet(nn.Module):
    """Stands in for a task's network: records the conditioning it is called with; predicts zeros (+ a bias)."""

    in_channels: int = 3
    out_channels: int = 6
    learned_null_text: bool = True

    @nn.compact
    def __call__(self, x_t, t, **cond):
        bias = self.param("bias", nn.initializers.zeros, ())
        _SEEN.append({k: v for k, v in cond.items() if k != "deterministic"})
        return jnp.zeros(x_t.shape[:-1] + (self.out_channels,), jnp.float32) + bias

    def normalize(self, x):
        return x

    def denormalize(self, x):
        return x


def _recording_bernoulli(monkeypatch) -> list[tuple[float, int, np.ndarray, np.ndarray]]:
    """Patches ``base.bernoulli`` to record (p, n, key data, mask) of every draw (concrete values: eager only)."""
    draws = []
    real = base.bernoulli

    def bernoulli(rng, p, n):
        mask = real(rng, p, n)
        key = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        draws.append((p, n, np.asarray(key), np.asarray(mask)))
        return mask

    monkeypatch.setattr(base, "bernoulli", bernoulli)
    _SEEN.clear()
    return draws


def _experiment(stage: str, arg: str = "test"):
    """``experiments/<stage>.py:<arg>`` without a data folder."""
    return load_experiment(f"experiments/{stage}.py:{arg}")


def _rate_close(mask: np.ndarray, p: float, sigmas: float = 5.0) -> None:
    n = mask.size
    assert abs(mask.mean() - p) < sigmas * math.sqrt(p * (1 - p) / n), (mask.mean(), p)


def test_decoder_drops_image_embedding_10_and_caption_50_percent_independently(monkeypatch):
    draws = _recording_bernoulli(monkeypatch)
    cfg = _experiment("decoder")
    task = DecoderTask(
        _StubNet(in_channels=3, out_channels=6),  # learned-range variance: 2 x 3 channels
        cfg.diffusion,
        drop_image_prob=cfg.task.drop_image_prob,
        drop_caption_prob=cfg.task.drop_caption_prob,
    )
    b, d, length = 20_000, 4, 3
    rng = np.random.default_rng(0)
    batch = dict(
        image=jnp.asarray(rng.uniform(-1, 1, (b, 2, 2, 3)), jnp.float32),
        image_embeds=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        text_embeds=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        text_hidden_states=jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32),
    )
    params = task.init(jax.random.PRNGKey(0), batch)["params"]
    _SEEN.clear()
    loss, _ = task.loss(params, batch, jax.random.PRNGKey(3), {})
    assert np.isfinite(float(loss))
    assert len(draws) == 2 and len(_SEEN) == 1, (len(draws), len(_SEEN))
    seen = _SEEN[0]
    drop_img, drop_cap = np.asarray(seen["drop_image_embeds"]), np.asarray(seen["drop_caption"])
    # Each mask the network got is one of the draws, with the paper's probability (section 2.1).
    by_mask = {p: mask for p, n, _, mask in draws if n == b}
    assert sorted(by_mask) == [0.1, 0.5], [p for p, *_ in draws]
    np.testing.assert_array_equal(drop_img, by_mask[0.1])
    np.testing.assert_array_equal(drop_cap, by_mask[0.5])
    # Two different keys, and the masks behave as independent Bernoulli(0.1) x Bernoulli(0.5).
    assert not np.array_equal(draws[0][2], draws[1][2])
    _rate_close(drop_img, 0.1)
    _rate_close(drop_cap, 0.5)
    _rate_close(drop_img & drop_cap, 0.05)
    # The caption's replacement (the null caption) and the embeddings themselves reach the network unchanged.
    np.testing.assert_array_equal(np.asarray(seen["image_embeds"]), np.asarray(batch["image_embeds"]))
    null_embeds, null_hidden, null_mask = seen["null_caption"]
    assert null_embeds.shape == (1, d) and null_hidden.shape == (1, length, d) and null_mask.shape == (1, length)


@pytest.mark.parametrize("learned_null_text", [True, False])
def test_prior_drops_the_caption_10_percent(monkeypatch, learned_null_text):
    """Learned null inputs get the mask (``drop_text``); Karlo's CLIP("") caption replaces the dropped rows."""
    draws = _recording_bernoulli(monkeypatch)
    cfg = _experiment("prior")
    b, d, length = 20_000, 4, 3
    null = dict(
        text_embeds=np.full((1, d), 7.0, np.float32),
        text_hidden_states=np.full((1, length, d), -3.0, np.float32),
        text_mask=np.asarray([[True, False, False]]),
    )
    task = PriorTask(
        _StubNet(out_channels=d, learned_null_text=learned_null_text),
        cfg.diffusion,
        drop_text_prob=cfg.task.drop_text_prob,
        null_caption=None if learned_null_text else null,
    )
    rng = np.random.default_rng(1)
    batch = dict(
        image_embeds=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        text_embeds=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        text_hidden_states=jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32),
    )
    params = task.init(jax.random.PRNGKey(0), batch)["params"]
    _SEEN.clear()
    task.loss(params, batch, jax.random.PRNGKey(4), {})
    assert [(p, n) for p, n, *_ in draws] == [(0.1, b)]  # section 2.2: caption dropped 10% of the time
    mask = draws[0][3]
    _rate_close(mask, 0.1)
    seen = _SEEN[-1]
    if learned_null_text:
        np.testing.assert_array_equal(np.asarray(seen["drop_text"]), mask)
        np.testing.assert_array_equal(np.asarray(seen["proj_embedding"]), np.asarray(batch["text_embeds"]))
    else:
        assert seen.get("drop_text") is None
        proj, hidden, amask = (
            np.asarray(seen[k]) for k in ("proj_embedding", "encoder_hidden_states", "attention_mask")
        )
        np.testing.assert_array_equal(proj[mask], np.broadcast_to(null["text_embeds"], (mask.sum(), d)))
        np.testing.assert_array_equal(proj[~mask], np.asarray(batch["text_embeds"])[~mask])
        np.testing.assert_array_equal(
            hidden[mask], np.broadcast_to(null["text_hidden_states"], (mask.sum(), length, d))
        )
        np.testing.assert_array_equal(amask[mask], np.broadcast_to(null["text_mask"], (mask.sum(), length)))
        assert amask[~mask].all()


def test_ar_prior_drops_the_caption_10_percent(monkeypatch, tmp_path):
    """The AR prior task (experiments/ar_prior.py:test, its codec from a file) draws one Bernoulli(0.1) mask."""
    draws = []
    real = base.bernoulli

    def bernoulli(rng, p, n):
        draws.append((p, n))  # under eval_shape: p and n are Python values, rng is abstract
        return real(rng, p, n)

    monkeypatch.setattr(base, "bernoulli", bernoulli)
    cfg = _experiment("ar_prior")
    module = ar_lib.build(cfg.model.variant)
    shapes = pca_codec.shapes(module.embedding_dim, module.num_components, module.num_buckets, module.num_dot_buckets)
    pca_codec.save(str(tmp_path / "codec.npz"), {k: np.zeros(s) for k, s in shapes.items()})
    cfg.task.codec = str(tmp_path / "codec.npz")
    task = make_task(cfg)
    b = 8
    batch = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in _ar_batch_shapes(module, b).items()}
    variables = jax.eval_shape(task.init, jax.random.PRNGKey(0), batch)
    extra = {k: v for k, v in variables.items() if k != "params"}
    jax.eval_shape(task.loss, variables["params"], batch, jax.random.PRNGKey(1), extra)  # traces, computes nothing
    assert draws == [(0.1, b)]


def _ar_batch_shapes(module, b):
    d, length, dt = module.embedding_dim, module.num_text_tokens, module.text_hidden_dim
    return dict(
        image_embeds=((b, d), jnp.float32),
        text_embeds=((b, d), jnp.float32),
        text_hidden_states=((b, length, dt), jnp.float32),
        text_mask=((b, length), jnp.bool_),
    )


def test_bernoulli_helper_rates():
    for p in (0.1, 0.5):
        _rate_close(np.asarray(base.bernoulli(jax.random.PRNGKey(0), p, 200_000)), p)


# ----------------------------------------------------------------------------- CLIP loss
def test_clip_hard_negatives_join_the_image_to_text_softmax():
    """With ``negative_input_ids``: image i's softmax runs over the B captions and its own swapped caption (where
    ``negative_valid``); text-to-image is unchanged; no valid negative gives exactly the plain loss."""
    from unclip_jax.models import clip as clip_lib

    task = ClipTask(clip_lib.build("test"))
    rng = np.random.default_rng(0)
    b, length = 4, task.module.text["context_length"]
    ids = rng.integers(1, 400, size=(2, b, length)).astype(np.int32)
    ids[:, :, 6] = 49407  # end tokens: the text embedding pools there
    batch = {"input_ids": ids[0], "pixel_values": rng.normal(size=(b, 32, 32, 3)).astype(np.float32)}
    params = task.init(jax.random.PRNGKey(0), batch)["params"]
    valid = np.asarray([True, False, True, True])
    loss_fn = jax.jit(lambda p, x: task.loss(p, x, jax.random.PRNGKey(0), {}))
    plain, _ = loss_fn(params, batch)
    loss, metrics = loss_fn(params, {**batch, "negative_input_ids": ids[1], "negative_valid": valid})
    none, _ = loss_fn(params, {**batch, "negative_input_ids": ids[1], "negative_valid": np.zeros(b, bool)})
    np.testing.assert_allclose(float(none), float(plain), rtol=1e-6)

    t, v, s = (np.asarray(x, np.float64) for x in task.embeddings(params, batch))
    tn, _, _ = (np.asarray(x, np.float64) for x in task.embeddings(params, {**batch, "input_ids": ids[1]}))
    logits = math.exp(s) * t @ v.T
    neg = math.exp(s) * np.sum(v * tn, axis=1)

    def ce(rows):  # mean of -log softmax(row)[i] over rows i
        return float(np.mean([np.log(np.exp(r - r.max()).sum()) + r.max() - r[i] for i, r in enumerate(rows)]))

    i2t = [np.append(logits.T[i], neg[i]) if valid[i] else logits.T[i] for i in range(b)]
    np.testing.assert_allclose(float(loss), 0.5 * (ce(logits) + ce(i2t)), rtol=1e-5)
    assert float(loss) > float(plain)  # one more column in three softmaxes
    want = np.mean([np.diag(logits)[i] > neg[i] for i in range(b) if valid[i]])
    np.testing.assert_allclose(float(metrics["acc_negative"]), want)


@_group("clip")
def test_clip_loss_is_symmetric_cross_entropy_with_a_learned_temperature():
    """loss = (CE(l, diag) + CE(l^T, diag)) / 2 with l = exp(min(s, log 100)) t @ v^T; d loss / d s != 0 below the
    clip, 0 above it; and training moved s (so the temperature is learned)."""
    run = _run("clip")
    task, batch = run.task, run.batch
    # Training moved s (d loss / d s was not 0); the loss is checked on the initial params (after 50 steps the
    # batch is memorised and the loss, ~1e-5, is below float32 resolution of the reference).
    assert not np.array_equal(jax.device_get(run.state.params)["logit_scale"], run.before["logit_scale"])
    params = run.before

    def loss_and_embeddings(p, s):
        t, v, _ = task.embeddings(p, batch)
        (loss, metrics), grad = jax.value_and_grad(
            lambda s: task.loss({**p, "logit_scale": s}, batch, jax.random.PRNGKey(0), {}), has_aux=True
        )(s)
        return loss, metrics, grad, t, v

    with parallel.mesh_context(run.mesh, run.rules):
        fn = jax.jit(loss_and_embeddings).lower(params, params["logit_scale"]).compile(FAST)

    def reference(t, v, s):
        t, v = np.asarray(t, np.float64), np.asarray(v, np.float64)
        scale = math.exp(min(float(s), math.log(100.0)))
        cos = t @ v.T
        logits = scale * cos
        n = len(logits)

        def ce(x):  # mean over rows of -log softmax(x)[i, i]
            x = x - x.max(1, keepdims=True)
            return float(np.mean(np.log(np.exp(x).sum(1)) - np.diag(x)))

        def softmax(x):
            e = np.exp(x - x.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        loss = 0.5 * (ce(logits) + ce(logits.T))
        eye = np.eye(n)
        dlogits = 0.5 * ((softmax(logits) - eye) / n + ((softmax(logits.T) - eye) / n).T)
        dscale = float(np.sum(dlogits * cos)) * scale if float(s) < math.log(100.0) else 0.0
        return loss, dscale

    s0 = np.asarray(params["logit_scale"])
    for s in (s0, np.asarray(math.log(1 / 0.07), s0.dtype), np.asarray(6.0, s0.dtype)):  # 6 > log 100: clipped
        loss, metrics, grad, t, v = fn(params, s)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(t), axis=-1), 1.0, rtol=1e-5)
        want_loss, want_grad = reference(t, v, s)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["temperature"]), math.exp(-min(float(s), math.log(100))), rtol=1e-5)
        np.testing.assert_allclose(float(grad), want_grad, rtol=1e-4, atol=1e-7)
        if float(s) < math.log(100.0):
            assert abs(float(grad)) > 1e-4, float(grad)
        else:
            assert float(grad) == 0.0


@pytest.mark.parametrize(
    "spec, field, size",
    [
        ("experiments/decoder.py:test", "data.image_size", 8),
        ("experiments/decoder_inpaint.py:test_inpaint", "data.image_size", 8),
        ("experiments/upsampler.py:test", "data.target_size", 64),
    ],
)
def test_the_network_samples_at_the_size_its_task_trains_at(spec, field, size):
    """The exported network's ``sample_size`` (what the cascade samples at) follows the data size of the run, not the
    variant's table: a decoder trained at 8x8 must not be sampled at its variant's 16."""
    default = make_task(load_experiment(spec)).module.sample_size
    assert default != size
    assert make_task(load_experiment(spec, {field: size})).module.sample_size == size
    # An explicit model override still wins (a network sampled at another size than its crops, on purpose).
    over = load_experiment(spec, {field: size})
    with over.unlocked():
        over.model.overrides.sample_size = 2 * size
    assert make_task(over).module.sample_size == 2 * size
