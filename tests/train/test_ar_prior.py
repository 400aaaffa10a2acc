"""AR prior through the shared train loop on the built-in dataset (embedded by the CLIP ``test`` variant).

A short run must lower the loss, and embeddings sampled for the training captions must be
closer (cosine) to the captions' true image embeddings than random training embeddings are.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.test_data import shared_embed_folder
from unclip_jax.input import pipelines
from unclip_jax.models import pca_codec
from unclip_jax.train import loop
from unclip_jax.train import metrics as metrics_lib
from unclip_jax.train.config_loading import load_experiment
from unclip_jax.train.tasks.ar_prior import make_ar_prior_task, read_embeddings

STEPS = 100


def _config(folder: str):
    return load_experiment(
        "experiments/ar_prior.py:test",
        {
            "data.folder": folder,
            "total_steps": STEPS,
            "log_every": 10,
            "checkpoint.every": STEPS,
            "checkpoint.async_save": False,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 10,
            "task.guidance_scale": 2.0,
            "task.temperature": 0.7,
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = shared_embed_folder()
    config = _config(folder)
    workdir = str(tmp_path_factory.mktemp("ar_prior"))
    # The loop builds the task (the registry's "ar_prior" row) and reads the prior's pipeline itself.
    result = loop.train_and_evaluate(config, workdir)
    task = make_ar_prior_task(config)  # the same codec: fitted deterministically on the same folder
    return folder, config, task, result, workdir


def _all_examples(folder: str) -> dict[str, np.ndarray]:
    batch = next(
        iter(pipelines.make_pipeline("prior", folder, global_batch_size=32, seed=0, shuffle=False, read_threads=1))
    )
    return {k: np.asarray(v) for k, v in batch.items()}


def test_codec_fitted_on_the_folder(trained):
    folder, _, task, result, _ = trained
    z, t = read_embeddings(folder)
    np.testing.assert_allclose(np.asarray(result.state.extra["stats"]["mean"]), z.mean(0), atol=1e-5)
    assert pca_codec.relative_mse(task.codec, z, quantized=False) < 0.01  # 8 of 32 components suffice here


def test_training_lowers_the_loss(trained):
    _, _, _, result, workdir = trained
    rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    first, last = rows[0], rows[-1]  # means over steps 1..10 and the last 10 steps
    assert first["step"] == 10 and last["step"] == STEPS and result.step == STEPS
    assert last["train/loss"] < 0.5 * first["train/loss"], (first, last)
    assert last["train/code_accuracy"] > first["train/code_accuracy"] + 0.3, (first, last)


def test_samples_are_closer_to_the_true_embeddings_than_random_ones(trained):
    """Through the task's preview (KV-cached sampler, guidance 2, temperature 0.7) for all 32 training captions."""
    folder, _, task, result, _ = trained
    ex = _all_examples(folder)
    batch = {k: jnp.asarray(v) for k, v in ex.items()}
    out = jax.jit(lambda p, e, b, r: task.sample(p, b, r, e))(
        result.state.params, result.state.extra, batch, jax.random.key(3)
    )
    target = ex["image_embeds"].astype(np.float64)
    n = len(target)
    pairs = pca_codec.cosine(target[:, None], target[None])  # a random training embedding vs the true one
    random_baseline = (pairs.sum() - np.trace(pairs)) / (n * (n - 1))
    sampled, to_other = float(out["cosine_to_target"]), float(out["cosine_to_other"])
    print(
        f"cosine: sampled {sampled:.4f}, random training embedding {random_baseline:.4f}, "
        f"sample vs another caption's {to_other:.4f}, codec ceiling {float(out['codec_cosine']):.4f}"
    )
    assert sampled > random_baseline + 0.1, (sampled, random_baseline)
    assert sampled > to_other + 0.1, (sampled, to_other)
    assert float(out["codec_cosine"]) > 0.95
    assert set(out) == {"cosine_to_target", "cosine_to_other", "codec_cosine", "dot"}


def test_export_holds_the_codec(trained):
    """The native EMA export reloads as an ARPrior whose variables carry the fitted codec."""
    from unclip_jax.convert.native import load_native
    from unclip_jax.models import ar_prior

    _, _, task, result, _ = trained
    module, variables = load_native(result.export_dir)
    assert isinstance(module, ar_prior.ARPrior) and module.num_components == task.module.num_components
    for k in pca_codec.STATE_KEYS:
        np.testing.assert_allclose(np.asarray(variables["stats"][k]), np.asarray(task.codec[k], np.float32))
    codes = jnp.zeros((2, module.num_components), jnp.int32)
    z = module.apply(variables, codes, method=ar_prior.ARPrior.decode_codes)
    np.testing.assert_allclose(
        np.asarray(z), pca_codec.decode(task.codec, np.zeros((2, module.num_components), int)), atol=1e-4
    )
