"""Diffusion prior task (paper section 2.2): x0-prediction MSE on normalised CLIP image embeddings.

Batch (from the prior pipeline)::

    image_embeds        [B, D]     float   CLIP image embedding z_i (the target)
    text_embeds         [B, D]     float   CLIP text embedding z_t
    text_hidden_states  [B, L, D]  float   CLIP caption hidden states
    text_mask           [B, L]     bool    caption mask (True = real token); optional

The target is ``(z_i - clip_mean) / clip_std`` (the model's ``stats`` collection, set from
``config.task.stats`` = an ``.npz`` with ``clip_mean`` / ``clip_std`` written by the
embedding precompute; identity when unset) and the network predicts x_0 directly
(``config.diffusion.mean_type = 'x_start'``, L = ||z_i - f(z_i^(t), t, y)||^2 as in the
paper). The caption (z_t, hidden states, mask) is dropped with probability
``config.task.drop_text_prob`` (10%) for classifier-free guidance: by the model's learned
null inputs when ``learned_null_text`` is on, otherwise by the encoding of the empty
caption (``config.task.null_caption`` .npz with text_embeds / text_hidden_states /
text_mask, as Karlo does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import sampling
from unclip_jax.input.precompute import STATS_FILE
from unclip_jax.models import prior as prior_lib
from unclip_jax.train.tasks import base


class PriorTask:
    """x0-prediction diffusion prior (:class:`unclip_jax.models.prior.PriorTransformer`)."""

    name = "prior"

    def __init__(
        self,
        module: prior_lib.PriorTransformer,
        diffusion_config: Mapping[str, Any],
        *,
        drop_text_prob: float,
        stats: dict[str, np.ndarray] | None = None,
        null_caption: dict[str, np.ndarray] | None = None,
    ):
        """``diffusion_config`` is ``config.diffusion`` (its fields and the previews' ``sample_steps``)."""
        self.diffusion_config, self.diffusion, self.sample_diffusion = base.diffusions(diffusion_config)
        if self.diffusion.model_mean_type != "x_start":
            raise ValueError(
                f"config.diffusion.mean_type={self.diffusion.model_mean_type!r}: the unCLIP prior predicts x_start"
            )
        self.module = module
        self.drop_text_prob = float(drop_text_prob)
        self.stats = stats
        self.null_caption = null_caption
        if drop_text_prob > 0 and not module.learned_null_text and null_caption is None:
            raise ValueError(
                "prior task: caption dropout needs model.overrides.learned_null_text=True or "
                "config.task.null_caption (an .npz with the empty caption's text_embeds/text_hidden_states/text_mask)"
            )

    def _inputs(self, batch: base.Batch) -> dict[str, jax.Array]:
        base.require(batch, ("image_embeds", "text_embeds", "text_hidden_states"), self.name)
        mask = base.text_mask(batch)
        return dict(
            proj_embedding=batch["text_embeds"].astype(jnp.float32),
            encoder_hidden_states=batch["text_hidden_states"].astype(jnp.float32),
            attention_mask=mask.astype(bool),
        )

    def init(self, rng: jax.Array, batch: base.Batch) -> dict[str, Any]:
        cond = self._inputs(batch)
        b = batch["image_embeds"].shape[0]
        variables = dict(
            self.module.init(
                {"params": rng},
                jnp.zeros(batch["image_embeds"].shape, jnp.float32),
                jnp.zeros((b,), jnp.int32),
                **cond,
                drop_text=jnp.zeros((b,), bool) if self.module.learned_null_text else None,
            )
        )
        if self.stats is not None:
            d = self.module.out_dim
            variables["stats"] = {
                "clip_mean": jnp.asarray(self.stats["clip_mean"], self.module.param_dtype).reshape(1, d),
                "clip_std": jnp.asarray(self.stats["clip_std"], self.module.param_dtype).reshape(1, d),
            }
        return variables

    def _cond(self, cond: dict[str, jax.Array], drop: jax.Array) -> dict[str, Any]:
        if self.module.learned_null_text:
            return dict(cond, drop_text=drop)
        if self.null_caption is None:
            return cond
        n = self.null_caption
        return dict(
            proj_embedding=base.replace_rows(drop, cond["proj_embedding"], n["text_embeds"]),
            encoder_hidden_states=base.replace_rows(drop, cond["encoder_hidden_states"], n["text_hidden_states"]),
            attention_mask=base.replace_rows(drop, cond["attention_mask"], n["text_mask"]),
        )

    def loss(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        return self.loss_from_draws(params, batch, self.draws(rng, batch), extra)

    def draws(self, rng: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
        """The step's random draws: ``t`` [B], ``weights`` [B], ``noise`` like z_i, the caption drop mask
        ``drop_text`` [B] bool and the ``dropout`` key."""
        drop_probs = dict(drop_text=self.drop_text_prob)
        return base.diffusion_draws(rng, batch["image_embeds"].shape, self.diffusion.num_timesteps, drop_probs)

    def loss_from_draws(
        self, params: Any, batch: base.Batch, draws: dict[str, jax.Array], extra: Any
    ) -> tuple[jax.Array, dict]:
        """The x0 MSE of ``batch`` for given :meth:`draws` (what :meth:`loss` computes)."""
        variables = {"params": params, **extra}
        x_start = self.module.apply(variables, batch["image_embeds"].astype(jnp.float32), method="normalize")
        cond = self._cond(self._inputs(batch), draws["drop_text"])

        def denoise(x_t, t_model, **kw):
            return self.module.apply(
                variables, x_t, t_model, **kw, deterministic=False, rngs={"dropout": draws["dropout"]}
            ).astype(jnp.float32)

        out = self.diffusion.training_losses(denoise, x_start, draws["t"], draws["noise"], **cond)
        loss = base.weighted_mean(out["loss"], draws["weights"])
        return loss, {"loss": loss, "mse": jnp.mean(out["mse"])}

    def sample(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> dict[str, Any]:
        """Samples z_i for the batch's captions; reports cosine similarity to the true z_i (no images)."""
        variables = {"params": params, **extra}
        cond = self._inputs(batch)
        target = batch["image_embeds"].astype(jnp.float32)

        def denoise(x_t, t_model, **kw):
            return self.module.apply(variables, x_t, t_model, **kw).astype(jnp.float32)

        z = sampling.p_sample_loop(self.sample_diffusion, denoise, target.shape, rng, cond=cond)
        z = self.module.apply(variables, z, method="denormalize")
        cos = jnp.sum(z * target, -1) / (jnp.linalg.norm(z, axis=-1) * jnp.linalg.norm(target, axis=-1) + 1e-8)
        return {"cosine_to_target": jnp.mean(cos)}


def prior_stats(config: Any) -> dict[str, np.ndarray] | None:
    """``clip_mean`` / ``clip_std`` of ``config.task.stats`` (or the data folder's stats file), None when neither."""
    path = base.data_file(config, "stats", STATS_FILE)
    arrays = base.load_arrays(path, ("mean", "std"), "config.task.stats")
    return None if arrays is None else {"clip_mean": arrays["mean"], "clip_std": arrays["std"]}


def make_prior_task(config: Any) -> PriorTask:
    """The task of ``config`` (``experiments/prior.py``): model ``config.model.variant``, ``config.diffusion``, the
    caption dropout, the embedding statistics and the null caption."""
    return PriorTask(
        prior_lib.build(config.model.variant, **base.model_kwargs(config.model)),
        config.diffusion,
        drop_text_prob=config.task.drop_text_prob,
        stats=prior_stats(config),
        null_caption=base.null_caption(config),
    )
