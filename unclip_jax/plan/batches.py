"""Abstract global batches of each input pipeline, and stand-ins for a task's data-folder files.

A plan compiles the train step for the shapes the stage's grain pipeline yields
(:mod:`unclip_jax.input.pipelines`, its field table) at the experiment's global ``batch_size``: shapes and dtypes
only (``jax.ShapeDtypeStruct``), no data. The widths come from the network (CLIP widths it expects) and from
``config.data`` (image and crop sizes).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import stages

TEXT_TOKENS = 77  # CLIP's context length (the pipelines' L)


def _caption_fields(b: int, d: int, length: int, width: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {
        "input_ids": ((b, TEXT_TOKENS), jnp.int32),
        "text_mask": ((b, length), jnp.bool_),
        "text_hidden_states": ((b, length, width), jnp.float32),
        "text_embeds": ((b, d), jnp.float32),
        "image_embeds": ((b, d), jnp.float32),
    }


def batch_shapes(config: Any, module: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{field: (shape, dtype)}`` of one global batch of ``config.task.name``'s input pipeline.

    Args:
      config: the experiment config (``batch_size``, ``task.name``, ``data.*``).
      module: the task's network (caption length and widths of the prior / decoder; CLIP's image size).
    """
    b = int(config.batch_size)
    stage = stages.task(config.task.name).input_stage
    if stage == "prior":
        d = module.embedding_dim
        length = getattr(module, "num_text_tokens", None) or module.num_embeddings
        width = getattr(module, "text_hidden_dim", None) or getattr(module, "encoder_hid_dim", None) or d
        return _caption_fields(b, d, length, width)
    if stage == "decoder":
        d, s = module.clip_embeddings_dim, int(config.data.image_size)
        return {"image": ((b, s, s, 3), jnp.float32), **_caption_fields(b, d, TEXT_TOKENS, d)}
    if stage == "upsampler":
        crop = int(round(float(config.data.crop_fraction) * int(config.data.target_size)))
        low = crop // int(config.data.low_res_factor)
        return {"image": ((b, crop, crop, 3), jnp.float32), "low_res": ((b, low, low, 3), jnp.float32)}
    if stage == "clip":
        s = int(module.vision["image_size"])
        length = int(module.text.get("context_length", TEXT_TOKENS))
        return {
            "pixel_values": ((b, s, s, 3), jnp.float32),
            "input_ids": ((b, length), jnp.int32),
            "text_mask": ((b, length), jnp.bool_),
        }
    raise ValueError(f"input pipeline {stage!r}: no batch shapes (expected one of {stages.INPUT_STAGES})")


def abstract_batch(config: Any, module: Any, sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """:func:`batch_shapes` as ``jax.ShapeDtypeStruct`` s (with ``sharding`` when given)."""
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for k, (shape, dtype) in batch_shapes(config, module).items()
    }


def add_stand_in_files(config: Any, folder: str) -> list[str]:
    """Points the task's data-folder files that the config leaves empty at zero-filled stand-ins in ``folder``.

    A task built for training reads small arrays from its data folder: the prior's empty-caption encoding
    (``config.task.null_caption``) when it has no learned null caption, the AR prior's fitted PCA codec
    (``config.task.codec``). Their values do not change what compiles, only their shapes matter.

    Returns:
      the ``config.task`` fields that were set (the config must be unlocked or have the fields).
    """
    set_fields = []
    name = config.task.name
    network = stages.resolve(stages.task(name).network)
    variant = {**network.VARIANTS[config.model.variant], **dict(config.model.overrides)}
    os.makedirs(folder, exist_ok=True)
    if name == "ar_prior" and not config.task.get("codec", ""):
        from unclip_jax.models import pca_codec

        shapes = pca_codec.shapes(
            variant["embedding_dim"], variant["num_components"], variant["num_buckets"], variant["num_dot_buckets"]
        )
        path = os.path.join(folder, f"codec_{config.model.variant}.npz")
        pca_codec.save(path, {k: np.zeros(s, np.float32) for k, s in shapes.items()})
        config.task.codec = path
        set_fields.append("task.codec")
    if name == "prior" and not variant.get("learned_null_text", False) and not config.task.null_caption:
        d = variant["embedding_dim"]
        length = variant.get("num_embeddings", TEXT_TOKENS)
        path = os.path.join(folder, f"null_caption_{config.model.variant}.npz")
        np.savez(
            path,
            text_embeds=np.zeros((1, d), np.float32),
            text_hidden_states=np.zeros((1, length, variant.get("encoder_hid_dim") or d), np.float32),
            text_mask=np.ones((1, length), bool),
        )
        config.task.null_caption = path
        set_fields.append("task.null_caption")
    return set_fields
