"""GLIDE's inpainting fine-tune (train/tasks/decoder_inpaint.py, issue 21): widening a trained decoder's input
convolution keeps its function exactly, the random masks (rectangles, free-form strokes), the task trains on a fixed
batch and its decoder inpaints through the pipeline (``method="model"``) keeping the unmasked pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax import parallel
from unclip_jax.convert import decoder as convert_decoder
from unclip_jax.convert import native
from unclip_jax.input.tokenizer import ClipTokenizer
from unclip_jax.models import decoder
from unclip_jax.pipeline import StageSettings, UnclipPipeline, testing
from unclip_jax.pipeline.cascade import Component
from unclip_jax.train import loop, optim
from unclip_jax.train.tasks import make_task
from unclip_jax.train.tasks.decoder_inpaint import random_inpaint_masks

pytestmark = pytest.mark.xdist_group("train_decoder_inpaint")
FAST = {"xla_backend_optimization_level": 0}


def _inputs(m, b=2, seed=0):
    rng = np.random.default_rng(seed)
    s, d = m.sample_size, m.clip_embeddings_dim
    return (
        jnp.asarray(rng.standard_normal((b, s, s, 3)), jnp.float32),
        jnp.asarray([3, 700]),
        jnp.asarray(rng.standard_normal((b, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, d)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, 7, d)), jnp.float32),
    )


def test_widened_input_conv_computes_the_same_function(tmp_path):
    m = decoder.build("test")
    args = _inputs(m)
    variables = testing.random_variables(m, np.random.default_rng(1), *args)
    native.save_native(m, variables, tmp_path / "decoder")
    wide_dir = convert_decoder.widen_for_inpainting(tmp_path / "decoder", tmp_path / "wide")
    wide, wide_vars = native.load_native(wide_dir)
    assert wide.in_channels == 7 and wide.image_channels == 3 and wide == decoder.build("test", in_channels=7)
    kernel = np.asarray(wide_vars["params"]["unet"]["conv_in"]["kernel"])
    assert kernel.shape[-2] == 7 and not kernel[..., 3:, :].any()
    np.testing.assert_array_equal(kernel[..., :3, :], variables["params"]["unet"]["conv_in"]["kernel"])
    rng = np.random.default_rng(2)
    image = jnp.asarray(rng.uniform(-1, 1, args[0].shape), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(*args[0].shape[:3], 1)) > 0.5, jnp.float32)
    before = m.apply(variables, *args)
    after = wide.apply(wide_vars, *args, inpaint_image=image, inpaint_mask=mask)
    # Exactly: the new channels add 0 * x terms, so the inpainting inputs do not change a single bit of the output ...
    other = wide.apply(wide_vars, *args, inpaint_image=-image, inpaint_mask=1.0 - mask)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(other))
    # ... and the output is the decoder's up to float32 rounding (conv_in sums 7 channels in another order than 3).
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs inpaint_image"):
        wide.apply(wide_vars, *args)


def test_random_masks_are_rectangles_and_strokes():
    draw = jax.jit(random_inpaint_masks, static_argnums=(1, 2))
    masks = np.asarray(draw(jax.random.PRNGKey(0), 64, 32))
    assert masks.shape == (64, 32, 32, 1) and set(np.unique(masks)) == {0.0, 1.0}
    holes = 1.0 - masks[..., 0]
    assert np.all(holes.sum((1, 2)) >= 1) and np.all(masks.sum((1, 2, 3)) >= 1)  # something erased, something kept

    def is_rectangle(h):
        ys, xs = np.nonzero(h)
        return h[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()

    kinds = [is_rectangle(h) for h in holes]
    assert 10 < sum(kinds) < 54  # both kinds, about half each
    np.testing.assert_array_equal(masks, np.asarray(draw(jax.random.PRNGKey(0), 64, 32)))


@pytest.fixture(scope="module")
def trained():
    """25 steps of ``experiments/decoder_inpaint.py:test_inpaint`` on one batch with the draws held fixed."""
    config = data.experiment("decoder_inpaint", "test_inpaint", batch_size=4)
    task = make_task(config)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = parallel.logical_rules(config.mesh)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = parallel.global_batch(data.first_batch(config), mesh)
    state, shardings, _ = loop.init_state(task, tx, jax.random.PRNGKey(0), batch, mesh, rules, compiler_options=FAST)
    step = loop.make_train_step(task, tx, schedule, base_rng=jax.random.PRNGKey(1), ema_decay=0.9)
    compiled = loop.compile_train_step(step, state, batch, shardings, mesh, rules, compiler_options=FAST)
    losses = []
    for _ in range(25):
        state, metrics = compiled(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["train/loss"]))
    return task, jax.device_get(state.params), losses


def test_inpainting_task_trains(trained):
    task, params, losses = trained
    print("decoder_inpaint losses", losses)
    assert task.module.in_channels == 7
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    kernel = np.asarray(params["unet"]["conv_in"]["kernel"])
    assert np.abs(kernel[..., 3:, :]).max() > 0  # the masked image and mask channels are used


def test_inpainting_decoder_keeps_the_unmasked_pixels_in_the_pipeline(trained):
    task, params, _ = trained
    parts = testing.random_components("test")
    parts["decoder"] = Component(task.module, {"params": params})
    pipe = UnclipPipeline(ClipTokenizer(pad_token="!"), **parts)
    rng = np.random.default_rng(3)
    source = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    mask = np.ones((16, 16), np.float32)
    mask[4:12, 2:10] = 0.0
    settings = dict(prior=StageSettings(2), decoder=StageSettings(3, guidance_scale=3.0))
    out = pipe.inpaint(source, mask, "a red circle", method="model", settings=settings, stop_after="decoder")
    keep = mask >= 0.5
    np.testing.assert_array_equal(out["images"][0][keep], source[keep])
    assert np.all(np.isfinite(out["images"]))
    with pytest.raises(ValueError, match="samples through inpaint"):
        pipe(["a red circle"], settings=settings, stop_after="decoder")
