"""The decoder with GLIDE's caption transformer end to end (issue 21, ``experiments/decoder.py:test_glide``): the
transformer trains with the U-Net (the loss falls on a fixed batch), a run checkpoints and exports a native folder
that loads back as the same module, that decoder samples through the pipeline (guided, into the upsampler), the
diffusers export refuses it in one line, and ``unclip plan`` lays its train step out under fsdp."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax import parallel
from unclip_jax.convert import decoder as convert_decoder
from unclip_jax.convert import io as convert_io
from unclip_jax.convert import native
from unclip_jax.input.tokenizer import ClipTokenizer
from unclip_jax.pipeline import StageSettings, UnclipPipeline
from unclip_jax.pipeline.cascade import Component
from unclip_jax.pipeline.testing import random_components
from unclip_jax.train import loop, optim
from unclip_jax.train.tasks import make_task

pytestmark = pytest.mark.xdist_group("train_glide_decoder")
FAST = {"xla_backend_optimization_level": 0}


def test_glide_text_encoder_trains_with_the_decoder_on_a_fixed_batch():
    """30 steps on one batch with the step's draws held fixed: the loss falls and the transformer's params move."""
    config = data.experiment("decoder", "test_glide", batch_size=4)
    task = make_task(config)
    assert task.module.glide
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    rules = parallel.logical_rules(config.mesh)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = parallel.global_batch(data.first_batch(config), mesh)
    state, shardings, _ = loop.init_state(task, tx, jax.random.PRNGKey(0), batch, mesh, rules, compiler_options=FAST)
    step = loop.make_train_step(task, tx, schedule, base_rng=jax.random.PRNGKey(1), ema_decay=0.9)
    compiled = loop.compile_train_step(step, state, batch, shardings, mesh, rules, compiler_options=FAST)
    before = jax.device_get(state.params["text_encoder"])
    losses = []
    for _ in range(30):
        state, metrics = compiled(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["train/loss"]))
    print("test_glide losses", losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    after = jax.device_get(state.params["text_encoder"])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
    assert all(moved), f"{sum(moved)}/{len(moved)} transformer params moved"


@pytest.fixture(scope="module")
def glide_run(tmp_path_factory):
    """``experiments/decoder.py:test_glide``: 4 steps of 8 examples, checkpoints every 2, export at the end."""
    workdir = str(tmp_path_factory.mktemp("glide"))
    config = data.experiment("decoder", "test_glide", total_steps=4, **{"checkpoint.every": 2})
    result = loop.train_and_evaluate(config, workdir)
    assert result.step == 4
    return config, workdir


def test_run_checkpoints_and_exports_a_native_glide_decoder(glide_run, tmp_path):
    config, workdir = glide_run
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [2, 4]
    module, variables = native.load_native(os.path.join(workdir, "export", "ema"))
    assert module == make_task(config).module and module.text_encoder == "glide"
    assert "token_embedding" in variables["params"]["text_encoder"]
    # diffusers' UnCLIPPipeline has no slot for the caption transformer: a one-line error that says so.
    with pytest.raises(convert_io.ConversionError, match="no diffusers equivalent") as e:
        convert_decoder.save_unclip_decoder(module, variables, tmp_path / "diffusers")
    assert "\n" not in str(e.value) and not (tmp_path / "diffusers").exists()


def test_trained_glide_decoder_samples_through_the_pipeline(glide_run):
    _, workdir = glide_run
    module, variables = native.load_native(os.path.join(workdir, "export", "ema"))
    parts = random_components("test")
    parts["decoder"] = Component(module, variables)
    pipe = UnclipPipeline(ClipTokenizer(pad_token="!"), **parts)
    settings = dict(prior=StageSettings(2), decoder=StageSettings(3, guidance_scale=4.0), super_res=StageSettings(2))
    out = pipe(["a red circle", "a blue square"], seed=0, settings=settings)
    assert out["decoder_images"].shape == (2, 16, 16, 3) and out["images"].shape == (2, 32, 32, 3)
    assert np.all(np.isfinite(out["images"])) and np.abs(out["images"]).max() <= 1.0
    # The caption reaches the decoder: the same z_i under two captions decodes differently.
    z = np.repeat(out["image_embeds"][:1], 2, axis=0)
    dec = pipe.decode(z, captions=["a red circle", "a blue square"], settings=settings, stop_after="decoder")
    assert np.abs(dec["images"][0] - dec["images"][1]).max() > 1e-3


def test_unclip_plan_lays_the_glide_decoder_out_under_fsdp(tmp_path):
    from unclip_jax.plan import commands

    out = tmp_path / "layout.json"
    argv = ["unclip plan", "--config=experiments/decoder.py:test_glide", "--topology=v5p:2x2x2", "--nocompile"]
    fsdp = ["--config.mesh.rules=fsdp", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    assert commands.main([*argv, *fsdp, f"--json={out}"]) == 0
    plan = json.loads(out.read_text())
    assert plan["mesh"]["fsdp"] == 8 and plan["fsdp_check"]["ok"], plan["fsdp_check"]
