"""Autoregressive prior task (paper section 2.2, appendix C): cross-entropy over the PCA codes of z_i.

Batch (the prior pipeline, :mod:`unclip_jax.input.pipelines` stage "prior")::

    image_embeds        [B, D]     float   CLIP image embedding z_i (encoded into the targets)
    text_embeds         [B, D]     float   CLIP text embedding z_t
    text_hidden_states  [B, L, Dt] float   CLIP caption hidden states
    text_mask           [B, L]     bool    caption mask (True = real token); optional

The targets are the quantised dot product z_i . z_t and the k codes of z_i, computed on the
fly by the codec in the model's ``stats`` collection (fitted before training, see
:func:`codec_from_config`). The loss is the mean cross-entropy over the k + 1 target
tokens (dot token included: it is part of the sequence the prior models, and its
distribution is what sampling truncates to the top half). The caption (hidden states,
mask and z_t) is dropped with probability ``config.task.drop_text_prob`` (10%) for
classifier-free guidance: by the model's learned null inputs (``learned_null_text``) or,
when ``config.task.null_caption`` is given, by the encoding of the empty caption.

Previews (:meth:`ArPriorTask.sample`) draw z_i with the KV-cached sampler and report the
cosine similarity to the caption's true z_i, to a random other example's z_i (the
baseline a caption-blind prior would get) and of the codec's own reconstruction (the
ceiling).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import pca_codec
from unclip_jax.train.tasks import base

CODEC_FILE = "ar_prior_codec.npz"


class ArPriorTask:
    """Autoregressive prior (:class:`unclip_jax.models.ar_prior.ARPrior`) with its fitted codec."""

    name = "ar_prior"
    diffusion_config = None

    def __init__(
        self,
        module: ar_lib.ARPrior,
        codec: pca_codec.State,
        *,
        drop_text_prob: float,
        null_caption: dict[str, np.ndarray] | None = None,
        guidance_scale: float | None,
        temperature: float,
        top_k: int,
        top_p: float,
    ):
        pca_codec.check(
            codec,
            pca_codec.shapes(module.embedding_dim, module.num_components, module.num_buckets, module.num_dot_buckets),
            where="ar_prior task codec (model variant vs fitted codec)",
        )
        if drop_text_prob > 0 and not module.learned_null_text and null_caption is None:
            raise ValueError(
                "ar_prior task: caption dropout needs model.overrides.learned_null_text=True or "
                "config.task.null_caption (an .npz with the empty caption's text_embeds/text_hidden_states/text_mask)"
            )
        if guidance_scale is not None and not module.learned_null_text:
            raise ValueError("ar_prior task: config.task.guidance_scale needs model.overrides.learned_null_text=True")
        self.module = module
        self.codec = codec
        self.drop_text_prob = float(drop_text_prob)
        self.null_caption = null_caption
        self.sample_kwargs = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)

    def _inputs(self, batch: base.Batch) -> dict[str, jax.Array]:
        base.require(batch, ("image_embeds", "text_embeds", "text_hidden_states"), self.name)
        mask = base.text_mask(batch)
        return dict(
            text_hidden_states=batch["text_hidden_states"].astype(jnp.float32),
            text_mask=mask.astype(bool),
            text_embeds=batch["text_embeds"].astype(jnp.float32),
        )

    def _cond(self, cond: dict[str, jax.Array], drop: jax.Array) -> dict[str, Any]:
        if self.module.learned_null_text:
            return dict(cond, drop_text=drop)
        n = self.null_caption
        return dict(
            text_hidden_states=base.replace_rows(drop, cond["text_hidden_states"], n["text_hidden_states"]),
            text_mask=base.replace_rows(drop, cond["text_mask"], n["text_mask"]),
            text_embeds=base.replace_rows(drop, cond["text_embeds"], n["text_embeds"]),
        )

    def init(self, rng: jax.Array, batch: base.Batch) -> dict[str, Any]:
        cond = self._inputs(batch)
        b = cond["text_embeds"].shape[0]
        k = self.module.num_components
        variables = dict(
            self.module.init(
                {"params": rng},
                **cond,
                dot_tokens=jnp.zeros((b,), jnp.int32),
                codes=jnp.zeros((b, k), jnp.int32),
                drop_text=jnp.zeros((b,), bool) if self.module.learned_null_text else None,
            )
        )
        variables[ar_lib.CODEC_COLLECTION] = ar_lib.codec_variables(self.codec)
        return variables

    def loss(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        variables = {"params": params, **extra}
        k_drop, k_dropout = jax.random.split(rng)
        cond = self._inputs(batch)
        b = cond["text_embeds"].shape[0]
        dot, codes = self.module.apply(
            variables, batch["image_embeds"], cond["text_embeds"], method=ar_lib.ARPrior.encode_targets
        )
        cond = self._cond(cond, base.bernoulli(k_drop, self.drop_text_prob, b))
        dot_logits, code_logits = self.module.apply(
            variables, **cond, dot_tokens=dot, codes=codes, deterministic=False, rngs={"dropout": k_dropout}
        )
        dot_ce = optax.softmax_cross_entropy_with_integer_labels(dot_logits, dot)  # [B]
        code_ce = optax.softmax_cross_entropy_with_integer_labels(code_logits, codes)  # [B, k]
        k = codes.shape[1]
        loss = (jnp.mean(dot_ce) + k * jnp.mean(code_ce)) / (k + 1)
        acc = jnp.mean(jnp.argmax(code_logits, -1) == codes)
        return loss, {"loss": loss, "code_ce": jnp.mean(code_ce), "dot_ce": jnp.mean(dot_ce), "code_accuracy": acc}

    def sample(self, params: Any, batch: base.Batch, rng: jax.Array, extra: Any) -> dict[str, Any]:
        """Samples z_i for the batch's captions; cosine similarities to the truth, a baseline and the ceiling."""
        variables = {"params": params, **extra}
        cond = self._inputs(batch)
        out = ar_lib.sample(self.module, variables, **cond, rng=rng, **self.sample_kwargs)
        target = batch["image_embeds"].astype(jnp.float32)
        z = out["image_embeds"]
        recon = self.module.apply(
            variables,
            self.module.apply(variables, target, cond["text_embeds"], method=ar_lib.ARPrior.encode_targets)[1],
            method=ar_lib.ARPrior.decode_codes,
        )
        return {
            "cosine_to_target": jnp.mean(pca_codec.cosine(z, target)),
            "cosine_to_other": jnp.mean(pca_codec.cosine(z, jnp.roll(target, 1, axis=0))),
            "codec_cosine": jnp.mean(pca_codec.cosine(recon, target)),
            "dot": jnp.mean(out["dot"]),
        }


# ----------------------------------------------------------------------------- construction


def read_embeddings(folder: str, max_examples: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``image_embeds`` and ``text_embeds`` [N, D] of an "embed" shard folder (evenly strided if larger).

    Raises:
      KeyError: naming the folder when its records hold no embeddings (a "prepare" folder).
    """
    from unclip_jax.input.arrayrecord import ShardReader

    reader = ShardReader(folder)
    n = len(reader)
    if n == 0:
        raise ValueError(f"{folder}: no records to fit the ar_prior codec on")
    idx = np.unique(np.linspace(0, n - 1, min(n, int(max_examples))).round().astype(int))
    image, text = [], []
    for i in idx:
        rec = reader[int(i)]
        if "image_embeds" not in rec or "text_embeds" not in rec:
            raise KeyError(f"{folder}: record {i} has no image_embeds/text_embeds: the codec needs an 'embed' folder")
        image.append(np.asarray(rec["image_embeds"], np.float64))
        text.append(np.asarray(rec["text_embeds"], np.float64))
    return np.stack(image), np.stack(text)


def fit_codec(module: ar_lib.ARPrior, image_embeds: np.ndarray, text_embeds: np.ndarray) -> pca_codec.State:
    """Fits the codec with the model's k / V / Vd on training embeddings [N, D]."""
    return pca_codec.fit(
        image_embeds,
        module.num_components,
        module.num_buckets,
        text_embeds=text_embeds,
        num_dot_buckets=module.num_dot_buckets,
    )


def codec_from_config(config: Any, module: ar_lib.ARPrior) -> pca_codec.State:
    """The codec of an experiment: ``config.task.codec`` (an .npz of :func:`pca_codec.save`); when empty,
    ``<config.data.folder>/ar_prior_codec.npz`` if it exists; else one fitted on ``config.task.codec_fit_examples``
    records of ``config.data.folder`` (deterministic, so every process fits the same codec)."""
    path = config.task.codec
    folder = config.data.folder
    cached = os.path.join(folder, CODEC_FILE) if folder else ""
    if not path and cached and os.path.exists(cached):
        path = cached
    if path:
        return pca_codec.load(path)
    if not folder:
        raise ValueError("ar_prior task: set config.task.codec (a fitted codec .npz) or config.data.folder to fit one")
    image, text = read_embeddings(folder, int(config.task.codec_fit_examples))
    return fit_codec(module, image, text)


def make_ar_prior_task(config: Any) -> ArPriorTask:
    """The task of ``config`` (``experiments/ar_prior.py``): model ``config.model.variant``, codec, sampling."""
    module = ar_lib.build(config.model.variant, **base.model_kwargs(config.model))
    guidance = float(config.task.guidance_scale)
    return ArPriorTask(
        module,
        codec_from_config(config, module),
        drop_text_prob=config.task.drop_text_prob,
        null_caption=None if module.learned_null_text else base.null_caption(config),
        guidance_scale=guidance if guidance > 0 else None,
        temperature=float(config.task.temperature),
        top_k=int(config.task.top_k),
        top_p=float(config.task.top_p),
    )
