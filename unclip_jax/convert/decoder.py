"""Diffusers ``decoder`` (``UNet2DConditionModel``) and ``text_proj`` (``UnCLIPTextProjModel``) folders <-> Flax.

- ``decoder/`` <-> :class:`unclip_jax.models.decoder.Decoder` (variables ``{'params': ...}``).
- ``text_proj/`` <-> :class:`unclip_jax.models.decoder.UnCLIPTextProj`.
- a pipeline folder's ``decoder/`` + ``text_proj/`` <-> :class:`~unclip_jax.models.decoder.UnCLIPDecoder`
  (variables ``{'params': {'unet': ..., 'text_proj': ...}}``).

Flax parameter names mirror diffusers' module names (``down_blocks_0/resnets_1/conv1`` is
``down_blocks.0.resnets.1.conv1``; ``to_out`` is ``to_out.0``), so the U-Net's rules are
derived from the abstract parameter tree (:func:`unet_rules`) and checked against the
state dict in both directions by :mod:`unclip_jax.convert.mapping`. Residual shortcuts are
1x1 ``Conv2d`` in PyTorch and ``Dense`` here (``conv1x1_linear``).

The 4 extra context tokens: ``clip_extra_context_tokens_proj`` keeps diffusers' memory
order (output ``c * 4 + j`` is token j, channel c), so its weight maps as a plain Linear.
Karlo's original (non-diffusers) checkpoints are not read here: diffusers' conversion
script already split their fused per-head ``qkv`` weights into ``to_q/to_k/to_v``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.convert import io
from unclip_jax.convert.mapping import Rule, flatten, flax_to_torch, linear, norm, torch_to_flax
from unclip_jax.convert.native import as_variables, resolve_component_folder
from unclip_jax.models.decoder import Decoder, UnCLIPDecoder, UnCLIPTextProj

DIFFUSERS_VERSION = "0.42.1"

_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers)_(\d+)$")

DOWN_PLAIN, DOWN_ATTN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
UP_PLAIN, UP_ATTN = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
MID_ATTN = "UNetMidBlock2DSimpleCrossAttn"

UNET_REQUIRED = [
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "attention_head_dim",
    "cross_attention_dim",
    "class_embed_type",
]
# diffusers field -> value it must have (its diffusers default unless noted); anything else is unsupported.
UNET_FIXED = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "cross_attention_norm": None,
    "num_attention_heads": None,
    "projection_class_embeddings_input_dim": None,
}
TEXT_PROJ_REQUIRED = ["clip_embeddings_dim", "time_embed_dim", "cross_attention_dim"]


# ----------------------------------------------------------------------------------------- shared U-Net helpers
def torch_module_name(segment: str) -> str:
    """Flax module name -> diffusers module path segment (``resnets_0`` -> ``resnets.0``)."""
    m = _INDEXED.match(segment)
    if m:
        return f"{m[1]}.{m[2]}"
    return "to_out.0" if segment == "to_out" else segment


def unet_rules(abstract_params: dict[str, Any], flax_prefix: tuple[str, ...] = ("params",)) -> list[Rule]:
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


def channels_from_config(config: dict[str, Any], where: str) -> tuple[int, tuple[int, ...]]:
    """diffusers ``block_out_channels`` -> (model_channels, channel_mult)."""
    boc = list(config["block_out_channels"])
    if not boc or any(not isinstance(c, int) or c <= 0 for c in boc) or any(c % boc[0] for c in boc):
        raise io.ConversionError(
            f"{where}: block_out_channels={boc} must be positive multiples of the first entry "
            "(model_channels x channel_mult)"
        )
    return boc[0], tuple(c // boc[0] for c in boc)


def single_int(config: dict[str, Any], field: str, where: str) -> int:
    """A config field that may be an int or a list of equal ints."""
    v = config[field]
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise io.ConversionError(f"{where}: {field}={v}: per-level values are not supported (all must be equal)")
        v = v[0]
    if not isinstance(v, int):
        raise io.ConversionError(f"{where}: {field}={v!r}: expected an integer")
    return v


def check_fixed(config: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    """Every field of ``fixed`` present in ``config`` must have the supported value."""
    bad = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in config and config[k] != v]
    if bad:
        raise io.ConversionError(f"{where}: unsupported option(s) {bad}")


def _as_module(cls, kwargs: dict[str, Any], overrides: dict[str, Any], where: str):
    try:
        return cls(**{**kwargs, **overrides})
    except TypeError as e:
        raise io.ConversionError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------------------- decoder U-Net
def decoder_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> Decoder:
    """Our :class:`Decoder` from a diffusers ``UNet2DConditionModel`` config (Karlo family only)."""
    io.require_fields(config, UNET_REQUIRED, where)
    check_fixed(config, UNET_FIXED, where)
    model_channels, channel_mult = channels_from_config(config, where)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(channel_mult) or len(up) != len(channel_mult):
        raise io.ConversionError(
            f"{where}: {len(channel_mult)} block_out_channels but {len(down)} down / {len(up)} up block types"
        )
    bad = [t for t in down if t not in (DOWN_PLAIN, DOWN_ATTN)] + [t for t in up if t not in (UP_PLAIN, UP_ATTN)]
    if bad:
        raise io.ConversionError(
            f"{where}: block types {bad} are not supported (expected {DOWN_PLAIN}/{DOWN_ATTN} down, "
            f"{UP_PLAIN}/{UP_ATTN} up)"
        )
    attends = [t == DOWN_ATTN for t in down]
    if [t == UP_ATTN for t in up] != attends[::-1]:
        raise io.ConversionError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    if config["mid_block_type"] != MID_ATTN:
        raise io.ConversionError(f"{where}: mid_block_type={config['mid_block_type']!r}, expected {MID_ATTN!r}")
    if config["class_embed_type"] != "identity":
        raise io.ConversionError(
            f"{where}: class_embed_type={config['class_embed_type']!r}, expected 'identity' "
            "(the CLIP time embedding is added to the timestep embedding)"
        )
    kwargs = dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=single_int(config, "layers_per_block", where),
        attention_resolutions=tuple(2**i for i, a in enumerate(attends) if a),
        num_head_channels=single_int(config, "attention_head_dim", where),
        context_dim=single_int(config, "cross_attention_dim", where),
        use_scale_shift_norm=_scale_shift(config, where),
        time_embed_dim=config.get("time_embedding_dim"),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        dropout=config.get("dropout", 0.0),
        sample_size=config.get("sample_size") or 64,
    )
    return _as_module(Decoder, kwargs, overrides, where)


def _scale_shift(config: dict[str, Any], where: str) -> bool:
    v = config.get("resnet_time_scale_shift", "default")
    if v not in ("default", "scale_shift"):
        raise io.ConversionError(f"{where}: resnet_time_scale_shift={v!r}, expected 'default' or 'scale_shift'")
    return v == "scale_shift"


def _block_types(module: Decoder) -> tuple[list[str], list[str]]:
    n = len(module.channel_mult)
    bad = [r for r in module.attention_resolutions if r not in [2**i for i in range(n)]]
    if bad:
        raise io.ConversionError(
            f"Decoder.attention_resolutions={tuple(module.attention_resolutions)}: {bad} are not downsampling "
            f"factors of its {n} levels"
        )
    down = [DOWN_ATTN if module.level_attends(i) else DOWN_PLAIN for i in range(n)]
    up = [UP_ATTN if module.level_attends(n - 1 - i) else UP_PLAIN for i in range(n)]
    return down, up


def decoder_config(module: Decoder) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config.json reproducing ``module``."""
    down, up = _block_types(module)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": module.sample_size,
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "layers_per_block": module.num_res_blocks,
        "block_out_channels": list(module.block_out_channels),
        "down_block_types": down,
        "mid_block_type": MID_ATTN,
        "up_block_types": up,
        "cross_attention_dim": module.context_dim,
        "attention_head_dim": module.num_head_channels,
        "class_embed_type": "identity",
        "resnet_time_scale_shift": "scale_shift" if module.use_scale_shift_norm else "default",
        "time_embedding_dim": module.time_embed_dim,
        "norm_num_groups": module.norm_num_groups,
        "norm_eps": module.norm_eps,
        "flip_sin_to_cos": module.flip_sin_to_cos,
        "freq_shift": module.freq_shift,
        "dropout": module.dropout,
        **UNET_FIXED,
    }


def decoder_example_inputs(module: Decoder) -> tuple:
    """Smallest inputs that initialise every parameter of ``module``."""
    s = 2 ** (len(module.channel_mult) - 1)
    return (
        jnp.zeros((1, s, s, module.in_channels)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, module.context_dim)),
        jnp.zeros((1, module.temb_dim)),
    )


def abstract_params(module: nn.Module, example: tuple) -> dict[str, Any]:
    """Shapes of ``module``'s params (``jax.eval_shape`` of init, unboxed)."""
    out = jax.eval_shape(lambda: module.init(jax.random.key(0), *example))
    return nn.unbox(out)["params"]


def decoder_rules(module: Decoder, abstract: dict[str, Any] | None = None) -> list[Rule]:
    """The parameter map of a decoder U-Net (flax paths start with ``params``)."""
    return unet_rules(abstract or abstract_params(module, decoder_example_inputs(module)))


def _import(state: dict, rules: list[Rule], abstract: dict, module: nn.Module, where: str) -> dict[str, Any]:
    tree = torch_to_flax(state, rules, expected={"params": abstract}, where=where)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=module.param_dtype), tree)


def load_decoder(folder: str | os.PathLike, **overrides: Any) -> tuple[Decoder, dict[str, Any]]:
    """Imports a diffusers ``UNet2DConditionModel`` folder (or a pipeline folder's ``decoder/``).

    Args:
      folder: component or pipeline folder.
      **overrides: module fields to set (``dtype``, ``remat``, ...).

    Returns:
      (module, {'params': ...}).
    """
    folder = resolve_component_folder(folder, "decoder")
    module = decoder_from_config(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    abstract = abstract_params(module, decoder_example_inputs(module))
    return module, _import(io.read_safetensors(weights), unet_rules(abstract), abstract, module, str(weights))


def save_decoder(module: Decoder, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports to a diffusers ``UNet2DConditionModel`` folder (atomic)."""
    cfg = decoder_config(module)
    variables = as_variables(variables)
    state = flax_to_torch(jax.device_get(variables), decoder_rules(module), where="Decoder params")
    return io.write_folder(folder, cfg, state, weights_name=io.DIFFUSERS_WEIGHTS)


# ----------------------------------------------------------------------------------------- text_proj
def text_proj_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> UnCLIPTextProj:
    """Our :class:`UnCLIPTextProj` from a diffusers ``UnCLIPTextProjModel`` config."""
    io.require_fields(config, TEXT_PROJ_REQUIRED, where)
    kwargs = {k: config[k] for k in TEXT_PROJ_REQUIRED}
    kwargs["clip_extra_context_tokens"] = config.get("clip_extra_context_tokens", 4)
    return _as_module(UnCLIPTextProj, kwargs, overrides, where)


def text_proj_config(module: UnCLIPTextProj) -> dict[str, Any]:
    """A diffusers ``UnCLIPTextProjModel`` config.json reproducing ``module``."""
    if module.layer_norm_eps != 1e-5:
        raise io.ConversionError(f"UnCLIPTextProj.layer_norm_eps={module.layer_norm_eps}: diffusers uses 1e-5")
    return {
        "_class_name": "UnCLIPTextProjModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "clip_embeddings_dim": module.clip_embeddings_dim,
        "clip_extra_context_tokens": module.clip_extra_context_tokens,
        "cross_attention_dim": module.cross_attention_dim,
        "time_embed_dim": module.time_embed_dim,
    }


def text_proj_rules(flax_prefix: tuple[str, ...] = ("params",)) -> list[Rule]:
    """The parameter map of :class:`UnCLIPTextProj`."""
    p = flax_prefix
    return [
        Rule((*p, "learned_classifier_free_guidance_embeddings"), "learned_classifier_free_guidance_embeddings"),
        *linear((*p, "embedding_proj"), "embedding_proj"),
        *linear(
            (*p, "clip_image_embeddings_project_to_time_embeddings"),
            "clip_image_embeddings_project_to_time_embeddings",
        ),
        *linear((*p, "clip_extra_context_tokens_proj"), "clip_extra_context_tokens_proj"),
        *linear((*p, "encoder_hidden_states_proj"), "encoder_hidden_states_proj"),
        *norm((*p, "text_encoder_hidden_states_norm"), "text_encoder_hidden_states_norm"),
    ]


def text_proj_example_inputs(module: UnCLIPTextProj) -> tuple:
    d = module.clip_embeddings_dim
    return jnp.zeros((1, d)), jnp.zeros((1, d)), jnp.zeros((1, 1, d))


def load_text_proj(folder: str | os.PathLike, **overrides: Any) -> tuple[UnCLIPTextProj, dict[str, Any]]:
    """Imports a diffusers ``UnCLIPTextProjModel`` folder (or a pipeline folder's ``text_proj/``).

    Returns:
      (module, {'params': ...}).
    """
    folder = resolve_component_folder(folder, "text_proj")
    module = text_proj_from_config(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    abstract = abstract_params(module, text_proj_example_inputs(module))
    return module, _import(io.read_safetensors(weights), text_proj_rules(), abstract, module, str(weights))


def save_text_proj(module: UnCLIPTextProj, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports to a diffusers ``UnCLIPTextProjModel`` folder (atomic)."""
    cfg = text_proj_config(module)
    state = flax_to_torch(jax.device_get(as_variables(variables)), text_proj_rules(), where="UnCLIPTextProj params")
    return io.write_folder(folder, cfg, state, weights_name=io.DIFFUSERS_WEIGHTS)


# ----------------------------------------------------------------------------------------- both together
def unclip_decoder_from_parts(unet: Decoder, text_proj: UnCLIPTextProj, where: str, **overrides) -> UnCLIPDecoder:
    """The combined module of a U-Net and a text projection whose widths agree."""
    if text_proj.time_embed_dim != unet.temb_dim or text_proj.cross_attention_dim != unet.context_dim:
        raise io.ConversionError(
            f"{where}: text_proj (time_embed_dim {text_proj.time_embed_dim}, cross_attention_dim "
            f"{text_proj.cross_attention_dim}) does not fit the decoder (time embedding {unet.temb_dim}, "
            f"cross_attention_dim {unet.context_dim})"
        )
    kwargs = {f: getattr(unet, f) for f in unet.__dataclass_fields__ if f not in ("parent", "name")}
    kwargs.update(
        clip_embeddings_dim=text_proj.clip_embeddings_dim,
        clip_extra_context_tokens=text_proj.clip_extra_context_tokens,
    )
    return _as_module(UnCLIPDecoder, kwargs, overrides, where)


def load_unclip_decoder(folder: str | os.PathLike, **overrides: Any) -> tuple[UnCLIPDecoder, dict[str, Any]]:
    """Imports a pipeline folder's ``decoder/`` and ``text_proj/`` as one :class:`UnCLIPDecoder`.

    Returns:
      (module, {'params': {'unet': ..., 'text_proj': ...}}).
    """
    folder = Path(folder)
    unet, unet_vars = load_decoder(folder / "decoder")
    proj, proj_vars = load_text_proj(folder / "text_proj")
    module = unclip_decoder_from_parts(unet, proj, str(folder), **overrides)
    params = {"unet": unet_vars["params"], "text_proj": proj_vars["params"]}
    return module, {"params": jax.tree.map(lambda a: jnp.asarray(a, dtype=module.param_dtype), params)}


def save_unclip_decoder(module: UnCLIPDecoder, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports an :class:`UnCLIPDecoder` to ``folder/decoder`` and ``folder/text_proj`` (each atomic)."""
    folder = Path(folder)
    params = as_variables(variables)["params"]
    save_decoder(Decoder(**module.unet_kwargs()), {"params": params["unet"]}, folder / "decoder")
    save_text_proj(UnCLIPTextProj(**module.text_proj_kwargs()), {"params": params["text_proj"]}, folder / "text_proj")
    return folder
