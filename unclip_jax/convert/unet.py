"""What the decoder and super-resolution U-Net converters share: diffusers' U-Net config fields and parameter names.

Both U-Nets (:class:`unclip_jax.models.decoder.Decoder` <-> ``UNet2DConditionModel``, and
:class:`unclip_jax.models.upsampler.SuperResUNet` <-> ``UNet2DModel``) name their Flax modules after diffusers' module
paths (``down_blocks_0/resnets_1/conv1`` is ``down_blocks.0.resnets.1.conv1``; ``to_out`` is ``to_out.0``), so their
parameter maps are derived from the abstract parameter tree (:func:`unet_rules`) and checked against the state dict in
both directions by :mod:`unclip_jax.convert.mapping`. Residual shortcuts are 1x1 ``Conv2d`` in PyTorch and ``Dense``
here (``conv1x1_linear``). The config fields both U-Nets read and write the same way (channels, residual blocks,
timestep embedding, group norm) are :func:`unet_kwargs` / :func:`unet_config`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.convert import io
from unclip_jax.convert.mapping import Rule, flatten, torch_to_flax
from unclip_jax.convert.native import resolve_component_folder

_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers)_(\d+)$")

# The config fields every diffusers U-Net folder must have (each U-Net converter adds its own).
REQUIRED = [
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
]
# diffusers block types of the Karlo U-Nets.
DOWN_PLAIN, DOWN_ATTN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
UP_PLAIN, UP_ATTN = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"


def torch_module_name(segment: str) -> str:
    """Flax module name -> diffusers module path segment (``resnets_0`` -> ``resnets.0``)."""
    m = _INDEXED.match(segment)
    if m:
        return f"{m[1]}.{m[2]}"
    return "to_out.0" if segment == "to_out" else segment


def unet_rules(abstract_params: Mapping[str, Any], flax_prefix: tuple[str, ...] = ("params",)) -> list[Rule]:
    """Rules for a U-Net whose module names mirror diffusers' (Decoder, SuperResUNet).

    Args:
      abstract_params: the U-Net's params tree (arrays or ShapeDtypeStructs, unboxed).
      flax_prefix: path of that tree inside the variables.
    """
    rules = []
    for path, leaf in flatten(abstract_params).items():
        *mods, name = path
        key = ".".join(torch_module_name(s) for s in mods)
        if name == "kernel":
            if len(leaf.shape) == 4:
                kind = "conv"
            else:
                kind = "conv1x1_linear" if mods[-1] == "conv_shortcut" else "linear"
            rules.append(Rule((*flax_prefix, *path), f"{key}.weight", kind))
        elif name in ("scale", "bias"):
            rules.append(Rule((*flax_prefix, *path), f"{key}.{'weight' if name == 'scale' else 'bias'}"))
        else:
            raise ValueError(f"unet_rules: no diffusers name for parameter {'/'.join(path)}")
    return rules


def abstract_params(module: nn.Module, example: tuple) -> dict[str, Any]:
    """Shapes of ``module``'s params (``jax.eval_shape`` of init on ``example`` inputs, unboxed)."""
    out = jax.eval_shape(lambda: module.init(jax.random.key(0), *example))
    return nn.unbox(out)["params"]


def params_from_state(
    state: Mapping[str, Any], rules: list[Rule], abstract: Mapping[str, Any], module: nn.Module, where: str
) -> dict[str, Any]:
    """A state dict -> ``{'params': ...}`` checked against ``abstract``, cast to ``module.param_dtype``."""
    tree = torch_to_flax(state, rules, expected={"params": abstract}, where=where)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=module.param_dtype), tree)


def channels_from_config(config: Mapping[str, Any], where: str) -> tuple[int, tuple[int, ...]]:
    """diffusers ``block_out_channels`` -> (model_channels, channel_mult)."""
    boc = list(config["block_out_channels"])
    if not boc or any(not isinstance(c, int) or c <= 0 for c in boc) or any(c % boc[0] for c in boc):
        raise io.ConversionError(
            f"{where}: block_out_channels={boc} must be positive multiples of the first entry "
            "(model_channels x channel_mult)"
        )
    return boc[0], tuple(c // boc[0] for c in boc)


def single_int(config: Mapping[str, Any], field: str, where: str) -> int:
    """A config field that may be an int or a list of equal ints."""
    v = config[field]
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise io.ConversionError(f"{where}: {field}={v}: per-level values are not supported (all must be equal)")
        v = v[0]
    if not isinstance(v, int):
        raise io.ConversionError(f"{where}: {field}={v!r}: expected an integer")
    return v


def check_fixed(config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    """Every field of ``fixed`` present in ``config`` must have the supported value."""
    bad = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in config and config[k] != v]
    if bad:
        raise io.ConversionError(f"{where}: unsupported option(s) {bad}")


def unet_kwargs(config: Mapping[str, Any], where: str, default_sample_size: int) -> dict[str, Any]:
    """The module fields both U-Nets read from a diffusers U-Net config the same way (no block types)."""
    v = config.get("resnet_time_scale_shift", "default")
    if v not in ("default", "scale_shift"):
        raise io.ConversionError(f"{where}: resnet_time_scale_shift={v!r}, expected 'default' or 'scale_shift'")
    model_channels, channel_mult = channels_from_config(config, where)
    return dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=single_int(config, "layers_per_block", where),
        use_scale_shift_norm=v == "scale_shift",
        time_embed_dim=config.get("time_embedding_dim"),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        dropout=config.get("dropout", 0.0),
        sample_size=config.get("sample_size") or default_sample_size,
    )


def unet_config(module: nn.Module, class_name: str) -> dict[str, Any]:
    """The diffusers config fields both U-Nets write the same way (inverse of :func:`unet_kwargs`)."""
    return {
        "_class_name": class_name,
        "_diffusers_version": io.DIFFUSERS_VERSION,
        "sample_size": module.sample_size,
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "layers_per_block": module.num_res_blocks,
        "block_out_channels": list(module.block_out_channels),
        "resnet_time_scale_shift": "scale_shift" if module.use_scale_shift_norm else "default",
        "time_embedding_dim": module.time_embed_dim,
        "norm_num_groups": module.norm_num_groups,
        "norm_eps": module.norm_eps,
        "flip_sin_to_cos": module.flip_sin_to_cos,
        "freq_shift": module.freq_shift,
        "dropout": module.dropout,
    }


def load_unet(
    folder: str | os.PathLike,
    component: str,
    from_config: Callable[..., nn.Module],
    example_inputs: Callable[[nn.Module], tuple],
    overrides: Mapping[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    """Imports a diffusers U-Net folder (or a pipeline folder's ``component/``) as (module, ``{'params': ...}``).

    Args:
      folder: component or pipeline folder.
      component: the pipeline subfolder used when ``folder`` is a whole pipeline.
      from_config: ``(config, where, **overrides) -> module``.
      example_inputs: the smallest inputs that initialise every parameter of the module.
      overrides: module fields to set (``dtype``, ``remat``, ...).
    """
    folder = resolve_component_folder(folder, component)
    module = from_config(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    abstract = abstract_params(module, example_inputs(module))
    return module, params_from_state(io.read_safetensors(weights), unet_rules(abstract), abstract, module, str(weights))
