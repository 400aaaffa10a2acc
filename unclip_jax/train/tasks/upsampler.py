"""Upsampler task (paper section 2.1, appendix C): eps MSE on random crops with degraded conditioning.

Batch (from the upsampler pipeline, which crops and degrades on the fly)::

    image    [B, H, W, 3]      high-resolution random crop (a fraction of the target size,
                               ``crop_fraction`` = 0.25 in the paper), uint8 or float [-1, 1]
    low_res  [B, h, w, 3]      its degraded low-resolution version (Gaussian blur for stage
                               1, BSR for stage 2), same range convention

The task upsamples ``low_res`` to H x W with an antialiased bicubic ``jax.image.resize`` and
the network sees ``concat(x_t, upsampled low_res)`` (6 channels). Loss: L_simple on eps
(``config.diffusion.mean_type='epsilon'``, fixed variance; sampling uses DDIM as table 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import sampling
from unclip_jax.models import upsampler as upsampler_lib
from unclip_jax.train.tasks import base


def upsample(low_res: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, h, w, C] in [-1, 1] -> [B, H, W, C], bicubic with antialiasing (float32)."""
    b, _, _, c = low_res.shape
    return jax.image.resize(base.to_model_range(low_res), (b, size[0], size[1], c), "bicubic", antialias=True)


class UpsamplerTask:
    """eps-prediction training of :class:`unclip_jax.models.upsampler.SuperResUNet`."""

    name = "upsampler"

    def __init__(self, module: upsampler_lib.SuperResUNet, diffusion_config: Mapping[str, Any]):
        """``diffusion_config`` is ``config.diffusion`` (its fields and the previews' ``sample_steps``: "ddim..." samples
        with DDIM, anything else with DDPM ancestral steps)."""
        self.diffusion_config, self.diffusion, self.sample_diffusion = base.diffusions(diffusion_config)
        diffusion = self.diffusion
        if diffusion.model_mean_type not in ("epsilon", "v") or diffusion.learned_variance:
            raise ValueError(
                "config.diffusion: the upsampler predicts epsilon (or v, for small briefly trained models) with a "
                "fixed variance "
                f"(got mean_type={diffusion.model_mean_type!r}, var_type={diffusion.model_var_type!r})"
            )
        self.module = module
        self.sample_steps = str(self.diffusion_config["sample_steps"])

    def _low_res(self, batch: base.Batch) -> jax.Array:
        base.require(batch, ("image", "low_res"), self.name)
        return upsample(batch["low_res"], batch["image"].shape[1:3])

    def init(self, rng: jax.Array, batch: base.Batch) -> dict[str, Any]:
        x = jnp.zeros(batch["image"].shape, jnp.float32)
        return dict(self.module.init({"params": rng}, x, jnp.zeros((x.shape[0],), jnp.int32), self._low_res(batch)))

    def loss(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        variables = {"params": params, **extra}
        x_start = base.to_model_range(batch["image"])
        draws = base.diffusion_draws(rng, x_start.shape, self.diffusion.num_timesteps, {})

        def denoise(x_t, t_model, low_res):
            return self.module.apply(
                variables, x_t, t_model, low_res, deterministic=False, rngs={"dropout": draws["dropout"]}
            ).astype(jnp.float32)

        low_res = self._low_res(batch)
        out = self.diffusion.training_losses(denoise, x_start, draws["t"], draws["noise"], low_res=low_res)
        loss = base.weighted_mean(out["loss"], draws["weights"])
        return loss, {"loss": loss, "mse": jnp.mean(out["mse"])}

    def sample(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> dict[str, Any]:
        """[upsampled low-res | sample | real] rows: ``images`` [3B, H, W, 3] in [0, 1]."""
        variables = {"params": params, **extra}
        low = self._low_res(batch)
        x_real = base.to_model_range(batch["image"])

        def denoise(x_t, t_model, low_res):
            return self.module.apply(variables, x_t, t_model, low_res).astype(jnp.float32)

        loop = sampling.ddim_sample_loop if self.sample_steps.startswith("ddim") else sampling.p_sample_loop
        x = loop(self.sample_diffusion, denoise, x_real.shape, rng, cond={"low_res": low})
        return {"images": base.to_unit_range(jnp.concatenate([low, x, x_real], axis=0))}


def make_upsampler_task(config: Any) -> UpsamplerTask:
    """The task of ``config`` (``experiments/upsampler.py``): model ``config.model.variant`` and ``config.diffusion``."""
    module = upsampler_lib.build(config.model.variant, **base.model_kwargs(config.model, config.data.target_size))
    return UpsamplerTask(module, config.diffusion)
