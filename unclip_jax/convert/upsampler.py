"""Diffusers super-resolution U-Net (``UNet2DModel``) folders <-> :class:`SuperResUNet`.

Karlo's ``super_res_first`` / ``super_res_last`` and our 256->1024 ``upsampler_1024`` are this network. Only the
Karlo super-resolution family is accepted: ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` levels,
``UNetMidBlock2D`` with ``add_attention: false``, positional timestep embedding, no class embedding. Parameter names
and the config fields shared with the decoder U-Net are in :mod:`unclip_jax.convert.unet`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.convert import io, unet
from unclip_jax.convert.mapping import Rule, flax_to_torch
from unclip_jax.convert.native import as_variables
from unclip_jax.models.upsampler import SuperResUNet

REQUIRED = [*unet.REQUIRED, "add_attention"]
FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "add_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
}


def module_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> SuperResUNet:
    """Our :class:`SuperResUNet` from a diffusers ``UNet2DModel`` config (Karlo super-res family)."""
    io.require_fields(config, REQUIRED, where)
    unet.check_fixed(config, FIXED, where)
    kwargs = unet.unet_kwargs(config, where, default_sample_size=256)
    n = len(kwargs["channel_mult"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if down != [unet.DOWN_PLAIN] * n or up != [unet.UP_PLAIN] * n:
        raise io.ConversionError(
            f"{where}: down_block_types {down} / up_block_types {up}: expected {n} x {unet.DOWN_PLAIN} / {unet.UP_PLAIN} "
            "(the attention-free super-resolution U-Net)"
        )
    return io.build_module(SuperResUNet, kwargs, overrides, where)


# Fields diffusers 0.42.1 writes for every UNet2DModel (its __init__ defaults) that do not shape this attention-free
# U-Net: written as diffusers writes them, so a diffusers folder's config survives import + export unchanged.
WRITTEN_DEFAULTS = {
    "attention_head_dim": 8,
    "attn_norm_num_groups": None,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "num_train_timesteps": None,
    "upsample_type": "conv",
}


def config_from_module(module: SuperResUNet) -> dict[str, Any]:
    """A diffusers ``UNet2DModel`` config.json reproducing ``module`` (every field diffusers writes)."""
    n = len(module.channel_mult)
    return {
        **WRITTEN_DEFAULTS,
        **unet.unet_config(module, "UNet2DModel"),
        "down_block_types": [unet.DOWN_PLAIN] * n,
        "up_block_types": [unet.UP_PLAIN] * n,
        **FIXED,
    }


def example_inputs(module: SuperResUNet) -> tuple:
    """Smallest inputs that initialise every parameter of ``module``."""
    s = module.downsampling_factor
    return jnp.zeros((1, s, s, module.in_channels)), jnp.zeros((1,), jnp.int32)


def rules(module: SuperResUNet) -> list[Rule]:
    """The parameter map (flax paths start with ``params``)."""
    return unet.unet_rules(unet.abstract_params(module, example_inputs(module)))


def load_upsampler(
    folder: str | os.PathLike, component: str = "super_res_first", **overrides: Any
) -> tuple[SuperResUNet, dict[str, Any]]:
    """Imports a diffusers ``UNet2DModel`` folder (or a pipeline folder's ``component/``).

    Args:
      folder: component folder or pipeline folder.
      component: subfolder used when ``folder`` is a pipeline ("super_res_first", "super_res_last", ...).
      **overrides: module fields to set.

    Returns:
      (module, {'params': ...}).
    """
    return unet.load_unet(folder, component, module_from_config, example_inputs, overrides)


def save_upsampler(module: SuperResUNet, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports to a diffusers ``UNet2DModel`` folder (atomic)."""
    state = flax_to_torch(jax.device_get(as_variables(variables)), rules(module), where="SuperResUNet params")
    return io.write_folder(folder, config_from_module(module), state, weights_name=io.DIFFUSERS_WEIGHTS)
