"""Diffusers ``decoder`` (``UNet2DConditionModel``) and ``text_proj`` (``UnCLIPTextProjModel``) folders <-> Flax.

- ``decoder/`` <-> :class:`unclip_jax.models.decoder.Decoder` (variables ``{'params': ...}``).
- ``text_proj/`` <-> :class:`unclip_jax.models.decoder.UnCLIPTextProj`.
- a pipeline folder's ``decoder/`` + ``text_proj/`` <-> :class:`~unclip_jax.models.decoder.UnCLIPDecoder`
  (variables ``{'params': {'unet': ..., 'text_proj': ...}}``).

The U-Net's parameter names and config fields shared with the super-resolution U-Net are in
:mod:`unclip_jax.convert.unet`.

The 4 extra context tokens: ``clip_extra_context_tokens_proj`` keeps diffusers' memory
order (output ``c * 4 + j`` is token j, channel c), so its weight maps as a plain Linear.
Karlo's original (non-diffusers) checkpoints are not read here: diffusers' conversion
script already split their fused per-head ``qkv`` weights into ``to_q/to_k/to_v``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.convert import io
from unclip_jax.convert.mapping import Rule, flax_to_torch, linear, norm
from unclip_jax.convert.native import as_variables, load_native, resolve_component_folder, save_native
from unclip_jax.convert.unet import (
    DOWN_ATTN,
    DOWN_PLAIN,
    REQUIRED,
    UP_ATTN,
    UP_PLAIN,
    abstract_params,
    channels_from_config,
    check_fixed,
    load_unet,
    params_from_state,
    single_int,
    unet_config,
    unet_kwargs,
    unet_rules,
)
from unclip_jax.models.decoder import INPAINT_CHANNELS, Decoder, UnCLIPDecoder, UnCLIPTextProj, widen_input_conv
from unclip_jax.models.unet import AttentionUNetFields

MID_ATTN = "UNetMidBlock2DSimpleCrossAttn"

UNET_REQUIRED = [*REQUIRED, "mid_block_type", "attention_head_dim", "cross_attention_dim", "class_embed_type"]
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


# ----------------------------------------------------------------------------------------- decoder U-Net
def decoder_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> Decoder:
    """Our :class:`Decoder` from a diffusers ``UNet2DConditionModel`` config (Karlo family only)."""
    io.require_fields(config, UNET_REQUIRED, where)
    check_fixed(config, UNET_FIXED, where)
    n = len(channels_from_config(config, where)[1])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != n or len(up) != n:
        raise io.ConversionError(f"{where}: {n} block_out_channels but {len(down)} down / {len(up)} up block types")
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
        unet_kwargs(config, where, default_sample_size=64),
        attention_resolutions=tuple(2**i for i, a in enumerate(attends) if a),
        num_head_channels=single_int(config, "attention_head_dim", where),
        context_dim=single_int(config, "cross_attention_dim", where),
    )
    return io.build_module(Decoder, kwargs, overrides, where)


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


# Fields diffusers 0.42.1 writes for every UNet2DConditionModel (its __init__ defaults) that do not shape this
# U-Net: written as diffusers writes them, so a diffusers folder's config survives import + export unchanged.
UNET_WRITTEN_DEFAULTS = {
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_type": "default",
    "downsample_padding": 1,
    "reverse_transformer_layers_per_block": None,
    "transformer_layers_per_block": 1,
    "upcast_attention": False,
    "use_linear_projection": False,
}


def decoder_config(module: Decoder) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config.json reproducing ``module`` (every field diffusers writes)."""
    down, up = _block_types(module)
    return {
        **UNET_WRITTEN_DEFAULTS,
        **unet_config(module, "UNet2DConditionModel"),
        "down_block_types": down,
        "mid_block_type": MID_ATTN,
        "up_block_types": up,
        "cross_attention_dim": module.context_dim,
        "attention_head_dim": module.num_head_channels,
        "class_embed_type": "identity",
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


def decoder_rules(module: Decoder, abstract: dict[str, Any] | None = None) -> list[Rule]:
    """The parameter map of a decoder U-Net (flax paths start with ``params``)."""
    return unet_rules(abstract or abstract_params(module, decoder_example_inputs(module)))


def load_decoder(folder: str | os.PathLike, **overrides: Any) -> tuple[Decoder, dict[str, Any]]:
    """Imports a diffusers ``UNet2DConditionModel`` folder (or a pipeline folder's ``decoder/``).

    Args:
      folder: component or pipeline folder.
      **overrides: module fields to set (``dtype``, ``remat``, ...).

    Returns:
      (module, {'params': ...}).
    """
    return load_unet(folder, "decoder", decoder_from_config, decoder_example_inputs, overrides)


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
    return io.build_module(UnCLIPTextProj, kwargs, overrides, where)


def text_proj_config(module: UnCLIPTextProj) -> dict[str, Any]:
    """A diffusers ``UnCLIPTextProjModel`` config.json reproducing ``module``."""
    if module.layer_norm_eps != 1e-5:
        raise io.ConversionError(f"UnCLIPTextProj.layer_norm_eps={module.layer_norm_eps}: diffusers uses 1e-5")
    return {
        "_class_name": "UnCLIPTextProjModel",
        "_diffusers_version": io.DIFFUSERS_VERSION,
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
    return module, params_from_state(io.read_safetensors(weights), text_proj_rules(), abstract, module, str(weights))


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
    kwargs = AttentionUNetFields.fields_of(unet)
    kwargs.update(
        clip_embeddings_dim=text_proj.clip_embeddings_dim,
        clip_extra_context_tokens=text_proj.clip_extra_context_tokens,
    )
    return io.build_module(UnCLIPDecoder, kwargs, overrides, where)


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


def check_diffusers_exportable(module: UnCLIPDecoder) -> None:
    """Raises a one-line :class:`ConversionError` when ``module`` has parts a diffusers ``UnCLIPPipeline`` cannot
    hold: GLIDE's jointly trained caption transformer (diffusers' decoder reads frozen CLIP caption states through
    ``UnCLIPTextProjModel``) or the 4 extra input channels of GLIDE's inpainting decoder."""
    if getattr(module, "text_encoder", "clip") != "clip":
        raise io.ConversionError(
            f"UnCLIPDecoder(text_encoder={module.text_encoder!r}): its GLIDE caption transformer (params "
            "'text_encoder/...') has no diffusers equivalent; diffusers' UnCLIPPipeline decoder reads frozen CLIP "
            "caption states (text_proj). Keep this decoder in the native format"
        )
    if module.in_channels != 3:
        raise io.ConversionError(
            f"UnCLIPDecoder(in_channels={module.in_channels}): the inpainting inputs (masked image, mask) have no "
            "slot in diffusers' UnCLIPPipeline; keep this decoder in the native format"
        )


def save_unclip_decoder(module: UnCLIPDecoder, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports an :class:`UnCLIPDecoder` to ``folder/decoder`` and ``folder/text_proj`` (each atomic).

    Raises:
      ConversionError: a decoder with GLIDE's caption transformer (``text_encoder="glide"``) or inpainting inputs
        (diffusers' ``UnCLIPPipeline`` has no slot for either; keep such a decoder in the native format).
    """
    check_diffusers_exportable(module)
    folder = Path(folder)
    params = as_variables(variables)["params"]
    save_decoder(Decoder(**module.unet_kwargs()), {"params": params["unet"]}, folder / "decoder")
    save_text_proj(UnCLIPTextProj(**module.text_proj_kwargs()), {"params": params["text_proj"]}, folder / "text_proj")
    return folder


def widen_for_inpainting(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A native decoder folder (a training ``export/ema``) rewritten as GLIDE's inpainting decoder in ``out``.

    The module gets ``in_channels = 3 + 4`` (masked image and mask after x_t) and its input convolution zero weights
    for the new channels (:func:`unclip_jax.models.decoder.widen_input_conv`), so it starts from the decoder's
    function; ``out`` is the ``--config.init_from`` of ``experiments/decoder_inpaint.py``.

    Raises:
      ConversionError: the folder does not hold a 3-channel :class:`UnCLIPDecoder`.
    """
    module, variables = load_native(folder)
    if not isinstance(module, UnCLIPDecoder) or module.in_channels != 3:
        raise io.ConversionError(
            f"{folder}: expected a native UnCLIPDecoder with 3 input channels, got {type(module).__name__}"
            f" (in_channels={getattr(module, 'in_channels', None)})"
        )
    wide = dataclasses.replace(module, in_channels=3 + INPAINT_CHANNELS)
    params = widen_input_conv(as_variables(variables)["params"], wide.in_channels)
    save_native(wide, {**variables, "params": params}, out)
    return Path(out)
