"""transformers CLIP folders <-> :mod:`unclip_jax.models.clip`.

Components:
- ``text_encoder``: ``CLIPTextModelWithProjection`` (``config.json`` + ``model.safetensors``)
  <-> :class:`CLIPTextModel`.
- ``image_encoder``: ``CLIPVisionModelWithProjection`` <-> :class:`CLIPVisionModel`.
- ``clip``: ``CLIPModel`` (both towers + ``logit_scale``) <-> :class:`CLIP`.

The ``position_ids`` buffers that older checkpoints store are checked to be ``arange``
and dropped on import; they are never written (transformers rebuilds them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert import io
from unclip_jax.convert.mapping import Rule, flax_to_torch, linear, norm, torch_to_flax, transformer_block
from unclip_jax.convert.native import as_variables, resolve_component_folder
from unclip_jax.models.clip import CLIP, CLIPTextModel, CLIPVisionModel

TEXT_REQUIRED = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "vocab_size",
]
VISION_REQUIRED = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
]


def _encoder_rules(flax_prefix: tuple, torch_prefix: str, layers: int) -> list[Rule]:
    names = ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    names += ("layer_norm2", "mlp.fc1", "mlp.fc2")
    return [
        rule
        for i in range(layers)
        for rule in transformer_block(
            (*flax_prefix, "encoder", f"layers_{i}"), f"{torch_prefix}.encoder.layers.{i}", names
        )
    ]


def text_rules(module: CLIPTextModel, flax_prefix: tuple = ("params",)) -> list[Rule]:
    """Parameter map of the text tower (transformers keys ``text_model.*``, ``text_projection``)."""
    f = flax_prefix
    return [
        Rule((*f, "token_embedding", "embedding"), "text_model.embeddings.token_embedding.weight"),
        Rule((*f, "position_embedding"), "text_model.embeddings.position_embedding.weight"),
        *_encoder_rules(f, "text_model", module.layers),
        *norm((*f, "final_layer_norm"), "text_model.final_layer_norm"),
        *linear((*f, "text_projection"), "text_projection", bias=False),
    ]


def vision_rules(module: CLIPVisionModel, flax_prefix: tuple = ("params",)) -> list[Rule]:
    """Parameter map of the vision tower (transformers keys ``vision_model.*``, ``visual_projection``)."""
    f = flax_prefix
    return [
        Rule((*f, "class_embedding"), "vision_model.embeddings.class_embedding"),
        Rule((*f, "patch_embedding", "kernel"), "vision_model.embeddings.patch_embedding.weight", "conv"),
        Rule((*f, "position_embedding"), "vision_model.embeddings.position_embedding.weight"),
        *norm((*f, "pre_layrnorm"), "vision_model.pre_layrnorm"),
        *_encoder_rules(f, "vision_model", module.layers),
        *norm((*f, "post_layernorm"), "vision_model.post_layernorm"),
        *linear((*f, "visual_projection"), "visual_projection", bias=False),
    ]


def clip_rules(module: CLIP) -> list[Rule]:
    """Parameter map of the two-tower model (transformers ``CLIPModel``)."""
    return [
        *text_rules(_text_of(module), ("params", "text_model")),
        *vision_rules(_vision_of(module), ("params", "vision_model")),
        Rule(("params", "logit_scale"), "logit_scale"),
    ]


def _text_of(m: CLIP) -> CLIPTextModel:
    return CLIPTextModel(**{**dict(m.text or {}), "projection_dim": m.projection_dim})


def _vision_of(m: CLIP) -> CLIPVisionModel:
    return CLIPVisionModel(**{**dict(m.vision or {}), "projection_dim": m.projection_dim})


# ----------------------------------------------------------------------------- configs


def _sub(config: dict, key: str) -> dict:
    """A tower config from a tower folder or from a CLIPModel config (``text_config``/``vision_config``)."""
    if key in config:
        sub = dict(config[key])
        sub.setdefault("projection_dim", config.get("projection_dim", 512))
        return sub
    return config


def _tower_kwargs(c: dict, required: list[str], where: str) -> dict[str, Any]:
    """The fields both towers read from a transformers tower config the same way."""
    io.require_fields(c, [*required, "projection_dim"], where)
    return dict(
        width=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        mlp_dim=c["intermediate_size"],
        projection_dim=c["projection_dim"],
        act=c.get("hidden_act", "quick_gelu"),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
    )


def _tower_config(m: CLIPTextModel | CLIPVisionModel, architecture: str, model_type: str) -> dict[str, Any]:
    """The fields both towers write the same way (inverse of :func:`_tower_kwargs`)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "transformers_version": io.TRANSFORMERS_VERSION,
        "hidden_size": m.width,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "intermediate_size": m.mlp_dim,
        "projection_dim": m.projection_dim,
        "hidden_act": m.act,
        "layer_norm_eps": m.layer_norm_eps,
        "attention_dropout": 0.0,
        "dtype": "float32",
    }


def text_module_from_config(config: dict, where: str = "config.json", **overrides: Any) -> CLIPTextModel:
    """Our text tower from a transformers ``CLIPTextConfig`` (or ``CLIPConfig``) dict."""
    c = _sub(config, "text_config")
    return CLIPTextModel(
        **_tower_kwargs(c, TEXT_REQUIRED, where),
        **dict(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"]),
        eos_token_id=c.get("eos_token_id", 49407),
        **overrides,
    )


def vision_module_from_config(config: dict, where: str = "config.json", **overrides: Any) -> CLIPVisionModel:
    """Our vision tower from a transformers ``CLIPVisionConfig`` (or ``CLIPConfig``) dict."""
    c = _sub(config, "vision_config")
    return CLIPVisionModel(
        **_tower_kwargs(c, VISION_REQUIRED, where),
        **dict(image_size=c["image_size"], patch_size=c["patch_size"]),
        num_channels=c.get("num_channels", 3),
        **overrides,
    )


# Fields transformers 5.23 writes for every CLIPTextConfig (its defaults) that do not shape our text tower: written
# as transformers writes them, so a transformers folder's config survives import + export unchanged.
# (bos/pad token ids are not part of the tower; written as OpenAI's vocabulary has them where it is that one.)
TEXT_WRITTEN_DEFAULTS = {"initializer_factor": 1.0, "initializer_range": 0.02}


def text_config_from_module(m: CLIPTextModel) -> dict[str, Any]:
    """A ``CLIPTextModelWithProjection`` config.json reproducing ``m``."""
    return {
        **_tower_config(m, "CLIPTextModelWithProjection", "clip_text_model"),
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.context_length,
        "eos_token_id": m.eos_token_id,
        **({"bos_token_id": 49406, "pad_token_id": 1} if m.vocab_size == 49408 and m.eos_token_id != 2 else {}),
        **TEXT_WRITTEN_DEFAULTS,
    }


def vision_config_from_module(m: CLIPVisionModel) -> dict[str, Any]:
    """A ``CLIPVisionModelWithProjection`` config.json reproducing ``m``."""
    if m.stem != "patch":
        raise ValueError(
            f"CLIP vision tower with stem={m.stem!r}: transformers' CLIPVisionModel has only the patch convolution "
            "(stem='patch'); keep this model in the native format (unclip_jax.convert.native)"
        )
    return {
        **_tower_config(m, "CLIPVisionModelWithProjection", "clip_vision_model"),
        "image_size": m.image_size,
        "patch_size": m.patch_size,
        "num_channels": m.num_channels,
    }


def clip_config_from_module(m: CLIP) -> dict[str, Any]:
    """A ``CLIPModel`` config.json reproducing ``m``."""
    text, vision = text_config_from_module(_text_of(m)), vision_config_from_module(_vision_of(m))
    for c in (text, vision):
        for k in ("architectures", "transformers_version", "dtype"):
            c.pop(k)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "transformers_version": io.TRANSFORMERS_VERSION,
        "projection_dim": m.projection_dim,
        "logit_scale_init_value": m.logit_scale_init,
        "text_config": text,
        "vision_config": vision,
        "dtype": "float32",
    }


def clip_module_from_config(config: dict, where: str = "config.json", **overrides: Any) -> CLIP:
    """Our two-tower :class:`CLIP` from a transformers ``CLIPConfig`` dict."""
    io.require_fields(config, ["text_config", "vision_config", "projection_dim"], where)
    t = text_module_from_config(config, where)
    v = vision_module_from_config(config, where)
    tower = lambda m: {  # noqa: E731
        f: getattr(m, f) for f in m.__dataclass_fields__ if f not in ("parent", "name", "projection_dim", "dtype")
    }
    text = {k: val for k, val in tower(t).items() if k not in ("param_dtype", "remat")}
    vision = {k: val for k, val in tower(v).items() if k not in ("param_dtype", "remat")}
    return CLIP(
        projection_dim=config["projection_dim"],
        text=text,
        vision=vision,
        logit_scale_init=config.get("logit_scale_init_value", 2.6592),
        **overrides,
    )


# ----------------------------------------------------------------------------- state dicts


def _example(module: nn.Module) -> tuple:
    if isinstance(module, CLIPTextModel):
        return (jnp.zeros((1, module.context_length), jnp.int32),)
    if isinstance(module, CLIPVisionModel):
        return (jnp.zeros((1, module.image_size, module.image_size, module.num_channels), jnp.float32),)
    t, v = _text_of(module), _vision_of(module)
    return _example(t) + _example(v)


def rules(module: nn.Module) -> list[Rule]:
    """The parameter map of a tower or of :class:`CLIP` (by its class)."""
    if isinstance(module, CLIPTextModel):
        return text_rules(module)
    if isinstance(module, CLIPVisionModel):
        return vision_rules(module)
    if isinstance(module, CLIP):
        return clip_rules(module)
    raise TypeError(f"no CLIP converter for {type(module).__name__}")


def abstract_variables(module: nn.Module) -> dict[str, Any]:
    """Shapes of all variables of a tower or of :class:`CLIP` (``jax.eval_shape`` of init)."""
    return nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *_example(module))))


def _drop_buffers(state: dict, where: str) -> dict:
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            if not np.array_equal(np.asarray(v).reshape(-1), np.arange(np.asarray(v).size)):
                raise io.ConversionError(f"{where}: buffer {k} is not arange(n); custom position ids unsupported")
            continue
        out[k] = v
    return out


def state_to_variables(state: dict, module: nn.Module, where: str) -> dict[str, Any]:
    """A transformers state dict -> our variables (cast to ``module.param_dtype``)."""
    tree = torch_to_flax(_drop_buffers(state, where), rules(module), expected=abstract_variables(module), where=where)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=module.param_dtype), tree)


def variables_to_state(module: nn.Module, variables: dict) -> dict:
    """Our variables -> a transformers state dict (numpy)."""
    return flax_to_torch(jax.device_get(as_variables(variables)), rules(module), where=f"{type(module).__name__}")


def _load(folder, component, build, **overrides):
    folder = resolve_component_folder(folder, component)
    module = build(io.read_config(folder), str(Path(folder) / io.CONFIG), **overrides)
    weights = io.find_weights(folder)
    return module, state_to_variables(io.read_safetensors(weights), module, str(weights))


def load_text_encoder(folder: str | os.PathLike, **overrides: Any) -> tuple[CLIPTextModel, dict[str, Any]]:
    """Imports a ``CLIPTextModelWithProjection`` folder (or a pipeline's ``text_encoder/``).

    Returns:
      (module, variables) with variables = {'params': ...}.
    """
    return _load(folder, "text_encoder", text_module_from_config, **overrides)


def load_image_encoder(folder: str | os.PathLike, **overrides: Any) -> tuple[CLIPVisionModel, dict[str, Any]]:
    """Imports a ``CLIPVisionModelWithProjection`` folder (or a pipeline's ``image_encoder/``)."""
    return _load(folder, "image_encoder", vision_module_from_config, **overrides)


def load_clip(folder: str | os.PathLike, **overrides: Any) -> tuple[CLIP, dict[str, Any]]:
    """Imports a transformers ``CLIPModel`` folder."""
    return _load(folder, "clip", clip_module_from_config, **overrides)


def save_text_encoder(module: CLIPTextModel, variables: dict, folder: str | os.PathLike) -> Path:
    """Exports a ``CLIPTextModelWithProjection`` folder (atomic)."""
    state = variables_to_state(module, variables)
    return io.write_folder(folder, text_config_from_module(module), state, weights_name=io.TRANSFORMERS_WEIGHTS)


def save_image_encoder(module: CLIPVisionModel, variables: dict, folder: str | os.PathLike) -> Path:
    """Exports a ``CLIPVisionModelWithProjection`` folder (atomic)."""
    state = variables_to_state(module, variables)
    return io.write_folder(folder, vision_config_from_module(module), state, weights_name=io.TRANSFORMERS_WEIGHTS)


def save_clip(module: CLIP, variables: dict, folder: str | os.PathLike) -> Path:
    """Exports a transformers ``CLIPModel`` folder (atomic)."""
    state = variables_to_state(module, variables)
    return io.write_folder(folder, clip_config_from_module(module), state, weights_name=io.TRANSFORMERS_WEIGHTS)
