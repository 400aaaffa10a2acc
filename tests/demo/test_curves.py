"""The accuracy-vs-steps curves: which checkpoints are measured, the denoising error, and the plot."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax.demo import curves
from unclip_jax.diffusion.config import diffusion_from_config


def test_checkpoint_steps_reads_orbax_step_folders(tmp_path):
    assert curves.checkpoint_steps(tmp_path) == []
    for name in ("300", "100", "1000", "tmp_200", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "50").write_text("a file, not a checkpoint")
    assert curves.checkpoint_steps(tmp_path) == [100, 300, 1000]


def test_spread_keeps_the_last_and_spreads_evenly():
    steps = list(range(100, 1700, 100))  # 16 checkpoints
    assert curves.spread(steps, 4) == [100, 600, 1100, 1600]
    assert curves.spread(steps, 1) == [1600]
    assert curves.spread(steps, 0) == steps and curves.spread(steps[:3], 6) == steps[:3]


@pytest.mark.parametrize("mean_type", ["epsilon", "v"])
def test_denoising_mse_is_zero_for_the_true_output_and_closed_form_for_a_blind_one(mean_type):
    diffusion = diffusion_from_config({"steps": 1000, "mean_type": mean_type})
    x0 = np.random.default_rng(0).uniform(-0.9, 0.9, (3, 8, 8, 3)).astype(np.float32)
    key = jax.random.PRNGKey(1)
    noise = jax.random.normal(key, x0.shape)  # the noise denoising_mse draws from the same key

    def oracle(x_t, t):  # the output that reconstructs x0 exactly
        return noise if mean_type == "epsilon" else diffusion.predict_v(x0, t, noise)

    exact = curves.denoising_mse(oracle, diffusion, x0, key, timesteps=(50, 500, 900))
    assert list(exact) == ["50", "500", "900"]
    assert max(exact.values()) < 1e-8
    # a network that outputs zeros: x0_hat = x_t / sqrt(abar) for epsilon, sqrt(abar) x_t for v (then clipped)
    blind = curves.denoising_mse(lambda x_t, t: np.zeros_like(x_t), diffusion, x0, key, timesteps=(300,))
    abar = diffusion.alphas_cumprod[300]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * np.asarray(noise)
    pred = x_t / np.sqrt(abar) if mean_type == "epsilon" else np.sqrt(abar) * x_t
    np.testing.assert_allclose(blind["300"], np.mean((np.clip(pred, -1, 1) - x0) ** 2), rtol=1e-5)


def test_denoising_mse_reads_the_mean_part_of_a_learned_variance_output():
    diffusion = diffusion_from_config({"steps": 100, "mean_type": "epsilon", "var_type": "learned_range"})
    x0 = np.zeros((2, 4, 4, 3), np.float32)
    key = jax.random.PRNGKey(0)
    noise = jax.random.normal(key, x0.shape)
    out = curves.denoising_mse(lambda x_t, t: np.concatenate([noise, 7 + 0 * noise], -1), diffusion, x0, key, (10,))
    assert out["10"] < 1e-8


def test_plot_is_a_png():
    rows = [{"step": 100, "colour": 0.2, "shape": 0.3}, {"step": 200, "colour": 0.5, "shape": 0.4}]
    png = curves.plot(rows, rows[:1])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    full = [{**r, "colour_real_z": 0.6, "shape_real_z": 0.3, "denoising_mse": {"50": 1e-3, "900": 5e-2}} for r in rows]
    assert Image.open(io.BytesIO(curves.plot(full, rows))).format == "PNG"
