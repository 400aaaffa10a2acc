"""Decoder task (paper section 2.1): hybrid loss with learned-range variance, CFG dropouts.

Batch (from the decoder pipeline)::

    image               [B, 64, 64, 3]  uint8 [0, 255] or float [-1, 1]
    image_embeds        [B, D]          CLIP image embedding z_i
    text_embeds         [B, D]          CLIP text embedding z_t
    text_hidden_states  [B, L, D]       CLIP caption hidden states
    text_mask           [B, L] bool     optional

L_hybrid = L_simple + lambda L_vlb (Improved DDPM section 3.1; ``config.diffusion.loss_type
= 'hybrid'``, ``var_type = 'learned_range'``). Classifier-free guidance training: z_i is
replaced by the learned ``learned_classifier_free_guidance_embeddings`` with probability
``config.task.drop_image_prob`` (10%) and, independently, the caption by the empty
caption with probability ``config.task.drop_caption_prob`` (50%). With GLIDE's caption transformer
(``config.model.overrides.text_encoder = "glide"``, the paper's decoder) the network reads ``input_ids`` /
``text_mask`` instead of the CLIP caption states, the transformer trains with the U-Net, and the dropped caption
is GLIDE's empty caption (:func:`unclip_jax.models.glide_text.empty_caption`). Otherwise the empty caption comes
from ``config.task.null_caption`` (an .npz with ``text_embeds`` [1, D],
``text_hidden_states`` [1, L, D], ``text_mask`` [1, L]: CLIP of "" as the sampler's
unconditional branch uses) or, when unset, is all zeros with only the first token
visible (then the sampler must use the same zeros).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import sampling
from unclip_jax.models import decoder as decoder_lib
from unclip_jax.train.tasks import base

COND_KEYS = ("image_embeds", "text_embeds", "text_hidden_states")


def zeros_caption(dim: int, length: int) -> dict[str, np.ndarray]:
    """The fallback null caption: zero embeddings, only the first token visible."""
    mask = np.zeros((1, length), bool)
    mask[:, 0] = True
    return dict(
        text_embeds=np.zeros((1, dim), np.float32),
        text_hidden_states=np.zeros((1, length, dim), np.float32),
        text_mask=mask,
    )


class DecoderTask:
    """Hybrid-loss training of :class:`unclip_jax.models.decoder.UnCLIPDecoder`."""

    name = "decoder"

    def __init__(
        self,
        module: decoder_lib.UnCLIPDecoder,
        diffusion_config: Mapping[str, Any],
        *,
        drop_image_prob: float,
        drop_caption_prob: float,
        null_caption: dict[str, np.ndarray] | None = None,
    ):
        """``diffusion_config`` is ``config.diffusion`` (its fields and the previews' ``sample_steps``)."""
        self.diffusion_config, self.diffusion, self.sample_diffusion = base.diffusions(diffusion_config)
        diffusion = self.diffusion
        if diffusion.model_mean_type not in ("epsilon", "v"):
            raise ValueError(
                f"config.diffusion.mean_type={diffusion.model_mean_type!r}: the decoder predicts epsilon "
                "(the paper, Karlo) or v (small models trained briefly, e.g. the CPU demo)"
            )
        image_channels = getattr(module, "image_channels", module.in_channels)
        if (module.out_channels == 2 * image_channels) != diffusion.learned_variance:
            raise ValueError(
                f"config.diffusion.var_type={diffusion.model_var_type!r} does not fit the decoder's "
                f"out_channels={module.out_channels} (learned_range needs 2 * {image_channels} image channels)"
            )
        self.module = module
        self.glide = bool(getattr(module, "glide", False))  # GLIDE's caption transformer reads the caption tokens
        self.drop_image_prob = float(drop_image_prob)
        self.drop_caption_prob = float(drop_caption_prob)
        self.null_caption = null_caption

    def _cond(self, batch: base.Batch) -> dict[str, jax.Array]:
        if self.glide:
            base.require(batch, ("image", "image_embeds", "input_ids"), self.name)
            return dict(
                image_embeds=batch["image_embeds"].astype(jnp.float32),
                input_ids=batch["input_ids"].astype(jnp.int32),
                text_mask=batch.get("text_mask", jnp.ones(batch["input_ids"].shape, bool)).astype(bool),
            )
        base.require(batch, ("image", *COND_KEYS), self.name)
        mask = base.text_mask(batch)
        return dict(
            image_embeds=batch["image_embeds"].astype(jnp.float32),
            text_embeds=batch["text_embeds"].astype(jnp.float32),
            text_hidden_states=batch["text_hidden_states"].astype(jnp.float32),
            text_mask=mask.astype(bool),
        )

    def _null(self, cond: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        n = self.null_caption
        if n is None:
            n = zeros_caption(cond["text_embeds"].shape[-1], cond["text_hidden_states"].shape[1])
        return (jnp.asarray(n["text_embeds"]), jnp.asarray(n["text_hidden_states"]), jnp.asarray(n["text_mask"]))

    def extra_inputs(self, batch: base.Batch, draws: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """Network inputs beyond the conditioning (none here; the inpainting task adds the masked image)."""
        return {}

    def init(self, rng: jax.Array, batch: base.Batch) -> dict[str, Any]:
        cond = {**self._cond(batch), **self.extra_inputs(batch)}
        x = jnp.zeros(batch["image"].shape, jnp.float32)
        b = x.shape[0]
        return dict(self.module.init({"params": rng}, x, jnp.zeros((b,), jnp.int32), **cond))

    def loss(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        return self.loss_from_draws(params, batch, self.draws(rng, batch), extra)

    def draws(self, rng: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
        """The step's random draws: ``t`` [B], ``weights`` [B], ``noise`` like the image, the CFG drop masks
        ``drop_image_embeds`` / ``drop_caption`` [B] bool and the ``dropout`` key."""
        drop_probs = dict(drop_image_embeds=self.drop_image_prob, drop_caption=self.drop_caption_prob)
        return base.diffusion_draws(rng, batch["image"].shape, self.diffusion.num_timesteps, drop_probs)

    def loss_from_draws(
        self, params: Any, batch: base.Batch, draws: dict[str, jax.Array], extra: Any
    ) -> tuple[jax.Array, dict]:
        """The hybrid loss of ``batch`` for given :meth:`draws` (what :meth:`loss` computes)."""
        variables = {"params": params, **extra}
        x_start = base.to_model_range(batch["image"])
        cond = self._cond(batch)
        cond.update(drop_image_embeds=draws["drop_image_embeds"], drop_caption=draws["drop_caption"])
        cond.update(self.extra_inputs(batch, draws))
        if not self.glide:  # GLIDE's empty caption is fixed tokens (models.glide_text.empty_caption)
            cond["null_caption"] = self._null(cond)

        def denoise(x_t, t_model, **kw):
            return self.module.apply(
                variables, x_t, t_model, **kw, deterministic=False, rngs={"dropout": draws["dropout"]}
            ).astype(jnp.float32)

        out = self.diffusion.training_losses(denoise, x_start, draws["t"], draws["noise"], **cond)
        loss = base.weighted_mean(out["loss"], draws["weights"])
        return loss, {"loss": loss, "mse": jnp.mean(out["mse"]), "vb": jnp.mean(out["vb"])}

    def sample(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> dict[str, Any]:
        """Conditional samples (no guidance) next to the real images: ``images`` [2B, H, W, 3] in [0, 1]."""
        variables = {"params": params, **extra}
        cond = {**self._cond(batch), **self.extra_inputs(batch)}
        x_real = base.to_model_range(batch["image"])

        def denoise(x_t, t_model, **kw):
            return self.module.apply(variables, x_t, t_model, **kw).astype(jnp.float32)

        x = sampling.p_sample_loop(self.sample_diffusion, denoise, x_real.shape, rng, cond=cond)
        return {"images": base.to_unit_range(jnp.concatenate([x_real, x], axis=0))}


def make_decoder_task(config: Any) -> DecoderTask:
    """The task of ``config`` (``experiments/decoder.py``): model ``config.model.variant``, ``config.diffusion``, the
    two classifier-free guidance dropouts and the null caption."""
    return DecoderTask(
        decoder_lib.build(config.model.variant, **base.model_kwargs(config.model, config.data.image_size)),
        config.diffusion,
        drop_image_prob=config.task.drop_image_prob,
        drop_caption_prob=config.task.drop_caption_prob,
        null_caption=base.null_caption(config),
    )
