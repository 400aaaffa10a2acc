"""Diffusers ``PriorTransformer`` folder <-> :class:`unclip_jax.models.prior.PriorTransformer`.

Folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (Karlo's ``prior``), or a
whole pipeline folder (its ``prior/`` subfolder is used). Variables are
``{'params': ..., 'stats': {'clip_mean', 'clip_std'}}``; the diffusers parameters
``clip_mean``/``clip_std`` map to the ``stats`` collection. The non-persistent buffer
``causal_attention_mask`` is rebuilt from the config and never stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.convert import io
from unclip_jax.convert.mapping import Rule, flatten, flax_to_torch, linear, norm, torch_to_flax, transformer_block
from unclip_jax.convert.native import as_variables, resolve_component_folder
from unclip_jax.models.prior import PriorTransformer, example_inputs

REQUIRED = [
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "embedding_dim",
    "num_embeddings",
    "additional_embeddings",
]
# diffusers config field -> (our field, diffusers default)
OPTIONAL = {
    "dropout": ("dropout", 0.0),
    "time_embed_act_fn": ("time_embed_act_fn", "silu"),
    "norm_in_type": ("norm_in_type", None),
    "embedding_proj_norm_type": ("embedding_proj_norm_type", None),
    "time_embed_dim": ("time_embed_dim", None),
    "embedding_proj_dim": ("embedding_proj_dim", None),
    "clip_embed_dim": ("clip_embed_dim", None),
}


def rules(module: PriorTransformer) -> list[Rule]:
    """The parameter map of a prior (flax paths start with the collection name)."""
    p = ("params",)
    r = [
        *linear((*p, "time_embedding", "linear_1"), "time_embedding.linear_1"),
        *linear((*p, "time_embedding", "linear_2"), "time_embedding.linear_2"),
        *linear((*p, "proj_in"), "proj_in"),
        *linear((*p, "embedding_proj"), "embedding_proj"),
        *linear((*p, "encoder_hidden_states_proj"), "encoder_hidden_states_proj"),
        Rule((*p, "positional_embedding"), "positional_embedding"),
        Rule((*p, "prd_embedding"), "prd_embedding"),
        *norm((*p, "norm_out"), "norm_out"),
        *linear((*p, "proj_to_clip_embeddings"), "proj_to_clip_embeddings"),
        Rule(("stats", "clip_mean"), "clip_mean"),
        Rule(("stats", "clip_std"), "clip_std"),
    ]
    if module.norm_in_type == "layer":
        r += norm((*p, "norm_in"), "norm_in")
    if module.embedding_proj_norm_type == "layer":
        r += norm((*p, "embedding_proj_norm"), "embedding_proj_norm")
    names = ("norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm3", "ff.net.0.proj", "ff.net.2")
    for i in range(module.num_layers):
        r += transformer_block((*p, "transformer", f"layers_{i}"), f"transformer_blocks.{i}", names)
    return r


def module_from_config(config: dict[str, Any], where: str = "config.json", **overrides: Any) -> PriorTransformer:
    """Our module from a diffusers ``PriorTransformer`` config (unsupported options are errors)."""
    io.require_fields(config, REQUIRED, where)
    for field, want in (("encoder_hid_proj_type", "linear"), ("added_emb_type", "prd")):
        if config.get(field, want) != want:
            raise io.ConversionError(f"{where}: {field}={config[field]!r} is not supported (expected {want!r})")
    kwargs = {k: config[k] for k in REQUIRED}
    for src, (dst, default) in OPTIONAL.items():
        kwargs[dst] = config.get(src, default)
    try:
        module = PriorTransformer(**{**kwargs, **overrides})
        module.validate()
    except ValueError as e:
        raise io.ConversionError(f"{where}: {e}") from e
    return module


def config_from_module(module: PriorTransformer) -> dict[str, Any]:
    """A diffusers ``PriorTransformer`` config.json reproducing ``module``."""
    if module.encoder_hid_dim not in (None, module.embedding_dim):
        raise io.ConversionError(
            f"PriorTransformer.encoder_hid_dim={module.encoder_hid_dim} != embedding_dim={module.embedding_dim}: "
            "diffusers ties the caption width to embedding_dim, this prior cannot be exported"
        )
    cfg: dict[str, Any] = {"_class_name": "PriorTransformer", "_diffusers_version": io.DIFFUSERS_VERSION}
    cfg.update({k: getattr(module, k) for k in REQUIRED})
    cfg.update({src: getattr(module, dst) for src, (dst, _) in OPTIONAL.items()})
    cfg.update(encoder_hid_proj_type="linear", added_emb_type="prd")
    return cfg


def abstract_variables(module: PriorTransformer) -> dict[str, Any]:
    """Shapes of all variables (``jax.eval_shape`` of init, unboxed)."""
    import flax.linen as nn

    out = jax.eval_shape(lambda: module.init(jax.random.key(0), **example_inputs(module)))
    return nn.unbox(out)


def state_to_variables(state: dict, module: PriorTransformer, where: str) -> dict[str, Any]:
    """A diffusers state dict -> our variables (cast to ``module.param_dtype``)."""
    tree = torch_to_flax(state, rules(module), expected=abstract_variables(module), where=where)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=module.param_dtype), tree)


def variables_to_state(module: PriorTransformer, variables: dict) -> dict:
    """Our variables -> a diffusers state dict (numpy, float32 unless the params are bf16/f16)."""
    variables = as_variables(variables)
    extra = sorted("/".join(k) for k in flatten(variables) if k[1].startswith("null_"))
    if extra:
        raise io.ConversionError(
            f"PriorTransformer params {extra} (learned_null_text) have no diffusers equivalent; "
            "a diffusers prior uses the CLIP encoding of '' as its unconditional input"
        )
    return flax_to_torch(jax.device_get(variables), rules(module), where="PriorTransformer variables")


def load_prior(folder: str | os.PathLike, **overrides: Any) -> tuple[PriorTransformer, dict[str, Any]]:
    """Imports a diffusers prior folder (or a pipeline folder's ``prior/``).

    Args:
      folder: component or pipeline folder.
      **overrides: module fields to set (e.g. ``dtype=jnp.bfloat16``, ``remat=True``).

    Returns:
      (module, variables) with variables = {'params': ..., 'stats': {'clip_mean', 'clip_std'}}.
    """
    folder = resolve_component_folder(folder, "prior")
    module = module_from_config(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    return module, state_to_variables(io.read_safetensors(weights), module, str(weights))


def save_prior(module: PriorTransformer, variables: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Exports to a diffusers ``PriorTransformer`` folder (atomic)."""
    cfg = config_from_module(module)
    return io.write_folder(folder, cfg, variables_to_state(module, variables), weights_name=io.DIFFUSERS_WEIGHTS)
