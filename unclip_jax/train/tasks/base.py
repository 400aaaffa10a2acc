"""The Task interface: the ONLY place networks meet diffusion (or the contrastive loss).

The train loop knows a model only through a :class:`Task`:

- ``init(rng, batch) -> variables``: boxed variables (``nn.Partitioned`` leaves) of the
  model for a batch's shapes. The loop calls it under ``jax.eval_shape`` first (to get
  shardings) and then jitted into its shards, so it must only depend on shapes.
- ``loss(params, batch, rng, extra) -> (loss, metrics)``: scalar loss to minimise and a
  dict of scalar metrics (``loss`` and its parts). ``extra`` holds the non-trained
  variable collections (e.g. the prior's ``stats``).
- ``sample(params, batch, rng, extra) -> dict``: periodic previews; may hold ``images``
  (``[B, H, W, 3]`` float in [0, 1], written as a PNG grid) and scalar metrics
  (logged under ``preview/``).
- ``module``: the linen module (exported with :func:`unclip_jax.convert.native.save_native`).
- ``diffusion_config``: the ``config.diffusion`` fields the task trains with (written beside the
  export as ``diffusion.json``), or None for a task without a diffusion.

A task is built from the experiment config by its factory, ``make_<name>_task(config)``, which the
stage registry names (:data:`unclip_jax.stages.TASKS`; :func:`unclip_jax.train.tasks.make_task`).

Batches are dicts of arrays with the batch on axis 0. Images are NHWC; ``uint8`` images
are mapped from [0, 255] to [-1, 1], float images are taken to be in [-1, 1] already.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.config import diffusion_from_config
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.respace import respace
from unclip_jax.diffusion.timesteps import sample_timesteps
from unclip_jax.input.precompute import NULL_CAPTION_FILE

Batch = Mapping[str, jax.Array]


class Task(Protocol):
    """What the train loop needs from a stage (see the module docstring)."""

    name: str
    module: nn.Module
    diffusion_config: Mapping[str, Any] | None

    def init(self, rng: jax.Array, batch: Batch) -> dict[str, Any]: ...

    def loss(
        self, params: Any, batch: Batch, rng: jax.Array, extra: Mapping[str, Any]
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def sample(self, params: Any, batch: Batch, rng: jax.Array, extra: Mapping[str, Any]) -> dict[str, Any]: ...


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, field: str) -> Any:
    """Resolves a dtype name of the config; the error names ``field``."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def model_kwargs(model_cfg: Any, sample_size: int | None = None) -> dict[str, Any]:
    """``dtype`` / ``param_dtype`` / ``remat`` and the free-form ``overrides`` of ``config.model``.

    ``sample_size``: the side the task trains its images at (the decoder's ``data.image_size``, the upsampler's
    ``data.target_size``). The network's ``sample_size`` is the size the exported model is sampled at, so it is
    taken from the data rather than from the variant's table: a decoder trained with ``--config.data.image_size=16``
    then samples at 16.
    """
    kw: dict[str, Any] = dict(
        dtype=dtype_of(model_cfg.dtype, "config.model.dtype"),
        param_dtype=dtype_of(model_cfg.param_dtype, "config.model.param_dtype"),
        remat=bool(model_cfg.remat),
    )
    if sample_size is not None:
        kw["sample_size"] = int(sample_size)
    kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in dict(model_cfg.overrides).items()})
    return kw


def diffusions(diffusion_config: Mapping[str, Any]) -> tuple[dict[str, Any], GaussianDiffusion, GaussianDiffusion]:
    """``config.diffusion`` as plain values, its training diffusion and the preview diffusion.

    The training diffusion is :func:`unclip_jax.diffusion.config.diffusion_from_config`; previews sample with it
    respaced to ``sample_steps`` (e.g. "unclip25", "ddim27"; :func:`unclip_jax.diffusion.respace.respace`).
    """
    plain = dict(diffusion_config.items())
    diffusion = diffusion_from_config(plain)
    return plain, diffusion, respace(diffusion, str(plain["sample_steps"]))


def data_file(config: Any, field: str, default_name: str) -> str | None:
    """``config.task.<field>`` or, when empty, ``<config.data.folder>/<default_name>`` if that exists."""
    if config.task[field]:
        return config.task[field]
    folder = config.data.folder
    candidate = os.path.join(folder, default_name) if folder else ""
    return candidate if candidate and os.path.exists(candidate) else None


NULL_CAPTION_KEYS = ("text_embeds", "text_hidden_states", "text_mask")


def null_caption(config: Any) -> dict[str, np.ndarray] | None:
    """The empty caption's CLIP encoding (``config.task.null_caption`` or the data folder's), None when neither."""
    path = data_file(config, "null_caption", NULL_CAPTION_FILE)
    return load_arrays(path, NULL_CAPTION_KEYS, "config.task.null_caption")


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are returned as float32 (taken to be in [-1, 1])."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def to_unit_range(images: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1], clipped (for PNG previews)."""
    return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def bernoulli(rng: jax.Array, p: float, n: int) -> jax.Array:
    """[n] bool, True with probability ``p`` (classifier-free guidance dropouts)."""
    return jax.random.uniform(rng, (n,)) < p


def diffusion_draws(
    rng: jax.Array, shape: tuple[int, ...], num_timesteps: int, drop_probs: Mapping[str, float]
) -> dict[str, jax.Array]:
    """The random draws of one diffusion training step on ``x_start`` of ``shape`` ([B, ...]).

    ``rng`` splits into the timestep key, the noise key, one key per classifier-free guidance mask of
    ``drop_probs`` (name -> probability, in order) and the dropout key. Returns ``t`` and ``weights`` [B]
    (:func:`unclip_jax.diffusion.timesteps.sample_timesteps`), ``noise`` float32 of ``shape``, each mask [B] bool
    and the ``dropout`` key.
    """
    k_t, k_noise, *k_masks, k_dropout = jax.random.split(rng, 3 + len(drop_probs))
    b = shape[0]
    t, weights = sample_timesteps(k_t, b, num_timesteps)
    draws = dict(t=t, weights=weights, noise=jax.random.normal(k_noise, shape, jnp.float32))
    draws.update({name: bernoulli(k, p, b) for (name, p), k in zip(drop_probs.items(), k_masks, strict=True)})
    draws["dropout"] = k_dropout
    return draws


def text_mask(batch: Batch) -> jax.Array:
    """The batch's caption mask ``text_mask`` [B, L] or, when it has none, all tokens visible."""
    mask = batch.get("text_mask")
    return jnp.ones(batch["text_hidden_states"].shape[:2], bool) if mask is None else mask


def weighted_mean(per_example: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.mean(per_example.astype(jnp.float32) * weights)


def require(batch: Batch, keys: tuple[str, ...], task: str) -> None:
    """Raises naming the missing batch keys of ``task``."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{task} task: batch lacks {missing}; it has {sorted(batch)} (expected {list(keys)})")


def load_arrays(path: str | None, keys: tuple[str, ...], field: str) -> dict[str, np.ndarray] | None:
    """Reads ``keys`` from an ``.npz`` (or a folder's ``.npz``) named by config ``field``; None when unset."""
    if not path:
        return None
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data]
            if missing:
                raise ValueError(f"{field}={path!r}: missing arrays {missing}; it has {sorted(data.files)}")
            return {k: np.asarray(data[k]) for k in keys}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field}={path!r}: file not found") from e


def replace_rows(drop: jax.Array, value: jax.Array, null: jax.Array) -> jax.Array:
    """``where(drop[b], null, value[b])`` with ``null`` of shape [1|B, ...] broadcast over the batch."""
    d = drop.reshape(drop.shape + (1,) * (value.ndim - 1))
    return jnp.where(d, jnp.asarray(null).astype(value.dtype), value)
