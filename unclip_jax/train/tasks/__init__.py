"""Tasks: the only place networks meet diffusion. :func:`make_task` builds the one named by ``config.task.name``."""

from __future__ import annotations

import os
from typing import Any

from unclip_jax.train.tasks import base
from unclip_jax.train.tasks.base import Task

TASKS = ("prior", "ar_prior", "decoder", "upsampler", "clip")
STATS_FILE = "image_embed_stats.npz"  # written by unclip_jax.input.precompute ("embed" jobs)
NULL_CAPTION_FILE = "null_caption.npz"


def _data_file(config: Any, field: str, default_name: str) -> str | None:
    """``config.task.<field>`` or, when empty, ``<config.data.folder>/<default_name>`` if that exists."""
    path = config.task.get(field, "") or ""
    if path:
        return path
    folder = config.get("data", {}).get("folder", "") if "data" in config else ""
    candidate = os.path.join(folder, default_name) if folder else ""
    return candidate if candidate and os.path.exists(candidate) else None


def _prior_stats(config: Any) -> dict | None:
    path = _data_file(config, "stats", STATS_FILE)
    arrays = base.load_arrays(path, ("mean", "std"), "config.task.stats")
    return None if arrays is None else {"clip_mean": arrays["mean"], "clip_std": arrays["std"]}


def make_task(config: Any) -> Task:
    """Builds the task of ``config.task.name`` with its model (``config.model.variant``) and diffusion.

    Raises:
      ValueError: naming ``config.task.name`` / ``config.model.variant`` when unknown.
    """
    name = config.task.name
    kw = base.model_kwargs(config.model)
    variant = config.model.variant
    null_keys = ("text_embeds", "text_hidden_states", "text_mask")
    if name == "prior":
        from unclip_jax.models import prior
        from unclip_jax.train.tasks.prior import PriorTask

        null = base.load_arrays(
            _data_file(config, "null_caption", NULL_CAPTION_FILE), null_keys, "config.task.null_caption"
        )
        return PriorTask(
            prior.build(variant, **kw),
            base.make_diffusion(config.diffusion),
            drop_text_prob=config.task.get("drop_text_prob", 0.1),
            sample_steps=config.diffusion.get("sample_steps", "unclip25"),
            stats=_prior_stats(config),
            null_caption=null,
        )
    if name == "ar_prior":
        from unclip_jax.train.tasks.ar_prior import make_ar_prior_task

        return make_ar_prior_task(config)
    if name == "decoder":
        from unclip_jax.models import decoder
        from unclip_jax.train.tasks.decoder import DecoderTask

        null = base.load_arrays(
            _data_file(config, "null_caption", NULL_CAPTION_FILE), null_keys, "config.task.null_caption"
        )
        return DecoderTask(
            decoder.build(variant, **kw),
            base.make_diffusion(config.diffusion),
            drop_image_prob=config.task.get("drop_image_prob", 0.1),
            drop_caption_prob=config.task.get("drop_caption_prob", 0.5),
            sample_steps=config.diffusion.get("sample_steps", "unclip25"),
            null_caption=null,
        )
    if name == "upsampler":
        from unclip_jax.models import upsampler
        from unclip_jax.train.tasks.upsampler import UpsamplerTask

        return UpsamplerTask(
            upsampler.build(variant, **kw),
            base.make_diffusion(config.diffusion),
            sample_steps=config.diffusion.get("sample_steps", "ddim27"),
        )
    if name == "clip":
        from unclip_jax.models import clip
        from unclip_jax.train.tasks.clip import ClipTask

        return ClipTask(clip.build(variant, **kw))
    raise ValueError(f"config.task.name={name!r}: expected one of {TASKS}")
