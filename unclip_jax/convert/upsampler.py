"""Diffusers ``super_res_first`` / ``super_res_last`` (``UNet2DModel``) folders <-> :class:`SuperResUNet`.

Only the Karlo super-resolution family is accepted: ``ResnetDownsampleBlock2D`` /
``ResnetUpsampleBlock2D`` levels, ``UNetMidBlock2D`` with ``add_attention: false``,
positional timestep embedding, no class embedding. Parameter names mirror diffusers'
module names; the rules come from :func:`unclip_jax.convert.decoder.unet_rules`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.convert import io
from unclip_jax.convert.decoder import (
    DIFFUSERS_VERSION,
    DOWN_PLAIN,
    UP_PLAIN,
    _as_module,
    _import,
    _scale_shift,
    abstract_params,
    channels_from_config,
    check_fixed,
    single_int,
    unet_rules,
)
from unclip_jax.convert.mapping import Rule, flax_to_torch
from unclip_jax.convert.native import as_variables, resolve_component_folder
from unclip_jax.models.upsampler import SuperResUNet

REQUIRED = [
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "add_attention",
]
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
COMPONENTS = ("super_res_first", "super_res_last")


def module_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> SuperResUNet:
    """Our :class:`SuperResUNet` from a diffusers ``UNet2DModel`` config (Karlo super-res family)."""
    io.require_fields(config, REQUIRED, where)
    check_fixed(config, FIXED, where)
    model_channels, channel_mult = channels_from_config(config, where)
    n = len(channel_mult)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if down != [DOWN_PLAIN] * n or up != [UP_PLAIN] * n:
        raise io.ConversionError(
            f"{where}: down_block_types {down} / up_block_types {up}: expected {n} x {DOWN_PLAIN} / {UP_PLAIN} "
            "(the attention-free super-resolution U-Net)"
        )
    kwargs = dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=single_int(config, "layers_per_block", where),
        use_scale_shift_norm=_scale_shift(config, where),
        time_embed_dim=config.get("time_embedding_dim"),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        dropout=config.get("dropout", 0.0),
        sample_size=config.get("sample_size") or 256,
    )
    return _as_module(SuperResUNet, kwargs, overrides, where)


def config_from_module(module: SuperResUNet) -> dict[str, Any]:
    """A diffusers ``UNet2DModel`` config.json reproducing ``module``."""
    n = len(module.channel_mult)
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": module.sample_size,
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "layers_per_block": module.num_res_blocks,
        "block_out_channels": list(module.block_out_channels),
        "down_block_types": [DOWN_PLAIN] * n,
        "up_block_types": [UP_PLAIN] * n,
        "resnet_time_scale_shift": "scale_shift" if module.use_scale_shift_norm else "default",
        "time_embedding_dim": module.time_embed_dim,
        "norm_num_groups": module.norm_num_groups,
        "norm_eps": module.norm_eps,
        "flip_sin_to_cos": module.flip_sin_to_cos,
        "freq_shift": module.freq_shift,
        "dropout": module.dropout,
        **FIXED,
    }


def example_inputs(module: SuperResUNet) -> tuple:
    """Smallest inputs that initialise every parameter of ``module``."""
    s = module.downsampling_factor
    return jnp.zeros((1, s, s, module.in_channels)), jnp.zeros((1,), jnp.int32)


def rules(module: SuperResUNet) -> list[Rule]:
    """The parameter map (flax paths start with ``params``)."""
    return unet_rules(abstract_params(module, example_inputs(module)))


def load_upsampler(
    folder: str | os.PathLike, component: str = "super_res_first", **overrides: Any
) -> tuple[SuperResUNet, dict[str, Any]]:
    """Imports a diffusers ``UNet2DModel`` folder (or a pipeline folder's ``component/``).

    Args:
      folder: component folder or pipeline folder.
      component: subfolder used when ``folder`` is a pipeline ("super_res_first" or "super_res_last").
      **overrides: module fields to set.

    Returns:
      (module, {'params': ...}).
    """
    folder = resolve_component_folder(folder, component)
    module = module_from_config(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    abstract = abstract_params(module, example_inputs(module))
    return module, _import(io.read_safetensors(weights), unet_rules(abstract), abstract, module, str(weights))


def load_super_res_first(folder: str | os.PathLike, **overrides: Any) -> tuple[SuperResUNet, dict[str, Any]]:
    """:func:`load_upsampler` for ``super_res_first`` (all but the last super-resolution step)."""
    return load_upsampler(folder, "super_res_first", **overrides)


def load_super_res_last(folder: str | os.PathLike, **overrides: Any) -> tuple[SuperResUNet, dict[str, Any]]:
    """:func:`load_upsampler` for ``super_res_last`` (the final super-resolution step)."""
    return load_upsampler(folder, "super_res_last", **overrides)


def save_upsampler(module: SuperResUNet, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports to a diffusers ``UNet2DModel`` folder (atomic)."""
    state = flax_to_torch(jax.device_get(as_variables(variables)), rules(module), where="SuperResUNet params")
    return io.write_folder(folder, config_from_module(module), state, weights_name=io.DIFFUSERS_WEIGHTS)
