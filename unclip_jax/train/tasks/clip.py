"""CLIP task: symmetric contrastive (InfoNCE) loss with a learned temperature (Radford et al. 2021, fig. 3).

Used to train a small CLIP from scratch for the built-in demo; pretrained CLIP is imported
with ``unclip convert`` otherwise. Batch::

    pixel_values  [B, S, S, 3]  float, CLIP-normalised (the clip pipeline's field), or
    image         [B, H, W, 3]  uint8 [0, 255] / float [-1, 1] (resized + normalised here)
    input_ids     [B, L]        int CLIP BPE tokens
    negative_input_ids [B, L]   optional: hard-negative captions (``data.caption_swaps``), with
    negative_valid     [B]      bool, False where the example has none

logits = exp(min(logit_scale, log 100)) * normalize(z_t) @ normalize(z_i)^T over the
GLOBAL batch (under ``jit`` with sharded batches XLA gathers the embeddings), loss =
(CE(logits, diag) + CE(logits^T, diag)) / 2. With gradient accumulation each microbatch
is its own contrastive batch (negatives come only from the microbatch).

Hard negatives (NegCLIP, Yuksekgonul et al. 2023; :mod:`unclip_jax.input.negatives`): each image's
own swapped caption joins the image-to-text softmax as one more column, so the image must score its
caption above the one that differs in a single word; the text-to-image direction is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unclip_jax.models import clip as clip_lib
from unclip_jax.train.tasks import base

MAX_LOGIT_SCALE = math.log(100.0)


def _unit(x: jax.Array) -> jax.Array:
    """float32 rows scaled to unit L2 norm (the cosine similarities' operands)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipTask:
    """Contrastive training of :class:`unclip_jax.models.clip.CLIP`."""

    name = "clip"
    diffusion_config = None

    def __init__(self, module: clip_lib.CLIP):
        self.module = module
        self.image_size = int(dict(module.vision or {}).get("image_size", 224))

    def _pixels(self, batch: base.Batch) -> jax.Array:
        if "pixel_values" in batch:
            return batch["pixel_values"].astype(jnp.float32)
        base.require(batch, ("image", "input_ids"), self.name)
        unit = (base.to_model_range(batch["image"]) + 1.0) / 2.0
        return clip_lib.preprocess_images(unit, self.image_size)

    def init(self, rng: jax.Array, batch: base.Batch) -> dict[str, Any]:
        return dict(self.module.init({"params": rng}, batch["input_ids"].astype(jnp.int32), self._pixels(batch)))

    def embeddings(self, params: Any, batch: base.Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """L2-normalised (text [B, P], image [B, P]) embeddings and the clipped log temperature."""
        out = self.module.apply({"params": params}, batch["input_ids"].astype(jnp.int32), self._pixels(batch))
        return (
            _unit(out["text_embeds"]),
            _unit(out["image_embeds"]),
            jnp.minimum(out["logit_scale"].astype(jnp.float32), MAX_LOGIT_SCALE),
        )

    def loss(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        del rng, extra
        t, v, log_scale = self.embeddings(params, batch)
        logits = jnp.exp(log_scale) * t @ v.T
        labels = jnp.arange(logits.shape[0])
        i2t, extra_metrics = logits.T, {}
        if "negative_input_ids" in batch:
            out = self.module.apply(
                {"params": params}, batch["negative_input_ids"].astype(jnp.int32), method="encode_text"
            )
            tn = _unit(out["text_embeds"])
            valid = batch["negative_valid"].astype(bool)
            neg = jnp.where(valid, jnp.exp(log_scale) * jnp.sum(v * tn, axis=-1), -1e9)
            i2t = jnp.concatenate([i2t, neg[:, None]], axis=1)
            beaten = (jnp.diagonal(logits) > neg) & valid
            extra_metrics["acc_negative"] = jnp.sum(beaten) / jnp.maximum(jnp.sum(valid), 1)
        l_t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        l_i2t = optax.softmax_cross_entropy_with_integer_labels(i2t, labels).mean()
        loss = 0.5 * (l_t2i + l_i2t)
        return loss, {
            "loss": loss,
            "loss_t2i": l_t2i,
            "loss_i2t": l_i2t,
            "acc_t2i": jnp.mean(jnp.argmax(logits, 1) == labels),
            "acc_i2t": jnp.mean(jnp.argmax(logits, 0) == labels),
            "temperature": jnp.exp(-log_scale),
            **extra_metrics,
        }

    def sample(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> dict[str, Any]:
        """Retrieval accuracy on the preview batch (no images)."""
        t, v, _ = self.embeddings(params, batch)
        sims = t @ v.T
        labels = jnp.arange(sims.shape[0])
        return {"retrieval_t2i": jnp.mean(jnp.argmax(sims, 1) == labels)}


def make_clip_task(config: Any) -> ClipTask:
    """The task of ``config`` (``experiments/clip.py``): model ``config.model.variant``."""
    return ClipTask(clip_lib.build(config.model.variant, **base.model_kwargs(config.model)))
