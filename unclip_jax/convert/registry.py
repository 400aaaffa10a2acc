"""The converter registry: one :class:`Converter` per component of the weight bridge, in :data:`CONVERTERS`.

A converter says how one network crosses between its PyTorch folder (diffusers / transformers: ``config.json`` +
safetensors) and our linen module + variables, in one vocabulary:

- ``config_from_torch(config, where, **overrides) -> module`` and ``config_to_torch(module) -> config``;
- ``rules(module)``: the parameter map (:mod:`unclip_jax.convert.mapping`);
- ``load(folder, **overrides) -> (module, variables)`` and ``save(module, variables, folder) -> folder``.

The keys are the pipeline components of :data:`unclip_jax.stages.COMPONENTS` (``text_encoder``, ``prior``,
``super_res_first``, ...) plus the bridge-only ones: ``clip`` (transformers' two-tower ``CLIPModel``),
``text_proj`` (``UnCLIPTextProjModel``) and ``unclip_decoder``. The ``decoder`` key is diffusers' ``decoder/``
folder (the bare U-Net, ``UNet2DConditionModel``); the pipeline's decoder component is that U-Net together with
``text_proj/``, which is ``unclip_decoder``: :func:`for_component` finds the converter of a pipeline component by
the network class it holds. The CLI (``unclip convert``), the Karlo pipeline folder bridge
(:mod:`unclip_jax.convert.pipeline`), the pipeline loader and the bench read this table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn

from unclip_jax import stages
from unclip_jax.convert import clip, decoder, io, prior, upsampler
from unclip_jax.convert.mapping import Rule
from unclip_jax.models.clip import CLIP, CLIPTextModel, CLIPVisionModel
from unclip_jax.models.decoder import Decoder, UnCLIPDecoder, UnCLIPTextProj
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.models.upsampler import SuperResUNet


@dataclasses.dataclass(frozen=True)
class Converter:
    """How one component is read from and written to its PyTorch folder.

    Attributes:
      name: the registry key.
      library: ``"diffusers"`` or ``"transformers"`` (the library that loads the exported folder).
      torch_class: the PyTorch class of the folder ('' when the component spans several folders).
      module_types: the linen classes it converts (``load`` returns the first; export checks against all).
      folders: the subfolders of a pipeline folder it reads and writes: one for most; ``decoder`` and
        ``text_proj`` for ``unclip_decoder``, whose ``load`` / ``save`` take the pipeline folder itself.
      load: ``(folder, **overrides) -> (module, variables)``; a whole pipeline folder works too.
      save: ``(module, variables, folder) -> folder``, atomic.
      config_from_torch: ``(config, where, **overrides) -> module`` (None for a component of several folders).
      config_to_torch: ``module -> config dict`` (None likewise).
      rules: ``module -> [Rule]`` (None likewise).
      index_package: the package ``model_index.json`` names for it when that is not ``library`` (diffusers records
        ``UnCLIPTextProjModel`` under its pipeline module ``unclip``).
    """

    name: str
    library: str
    torch_class: str
    module_types: tuple[type, ...]
    folders: tuple[str, ...]
    load: Callable[..., tuple[nn.Module, dict[str, Any]]]
    save: Callable[[nn.Module, dict[str, Any], Path], Path]
    config_from_torch: Callable[..., nn.Module] | None = None
    config_to_torch: Callable[[nn.Module], dict[str, Any]] | None = None
    rules: Callable[[nn.Module], list[Rule]] | None = None
    index_package: str = ""

    @property
    def index_entry(self) -> list[str]:
        """The component's ``model_index.json`` entry, ``[package, class]``."""
        return [self.index_package or self.library, self.torch_class]

    def pipeline_path(self, root: str | os.PathLike) -> Path:
        """Where ``load`` / ``save`` point inside the pipeline folder ``root``."""
        root = Path(root)
        return root if len(self.folders) > 1 else root / self.folders[0]


def _upsampler(name: str) -> Converter:
    return Converter(
        name,
        "diffusers",
        "UNet2DModel",
        (SuperResUNet,),
        (name,),
        functools.partial(upsampler.load_upsampler, component=name),
        upsampler.save_upsampler,
        upsampler.module_from_config,
        upsampler.config_from_module,
        upsampler.rules,
    )


def _tower(name: str, torch_class: str, module_type: type, load, save, from_config, to_config) -> Converter:
    return Converter(
        name, "transformers", torch_class, (module_type,), (name,), load, save, from_config, to_config, clip.rules
    )


CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        _tower(
            "text_encoder",
            "CLIPTextModelWithProjection",
            CLIPTextModel,
            clip.load_text_encoder,
            clip.save_text_encoder,
            clip.text_module_from_config,
            clip.text_config_from_module,
        ),
        Converter(
            "prior",
            "diffusers",
            "PriorTransformer",
            (PriorTransformer,),
            ("prior",),
            prior.load_prior,
            prior.save_prior,
            prior.module_from_config,
            prior.config_from_module,
            prior.rules,
        ),
        Converter(
            "decoder",
            "diffusers",
            "UNet2DConditionModel",
            (Decoder,),
            ("decoder",),
            decoder.load_decoder,
            decoder.save_decoder,
            decoder.decoder_from_config,
            decoder.decoder_config,
            decoder.decoder_rules,
        ),
        _upsampler("super_res_first"),
        _upsampler("super_res_last"),
        _upsampler("upsampler_1024"),
        _tower(
            "image_encoder",
            "CLIPVisionModelWithProjection",
            CLIPVisionModel,
            clip.load_image_encoder,
            clip.save_image_encoder,
            clip.vision_module_from_config,
            clip.vision_config_from_module,
        ),
        _tower(
            "clip",
            "CLIPModel",
            CLIP,
            clip.load_clip,
            clip.save_clip,
            clip.clip_module_from_config,
            clip.clip_config_from_module,
        ),
        Converter(
            "text_proj",
            "diffusers",
            "UnCLIPTextProjModel",
            (UnCLIPTextProj,),
            ("text_proj",),
            decoder.load_text_proj,
            decoder.save_text_proj,
            decoder.text_proj_from_config,
            decoder.text_proj_config,
            lambda module: decoder.text_proj_rules(),
        ),
        Converter(
            "unclip_decoder",
            "diffusers",
            "",
            (UnCLIPDecoder,),
            ("decoder", "text_proj"),
            decoder.load_unclip_decoder,
            decoder.save_unclip_decoder,
        ),
    )
}


def converter(name: str) -> Converter:
    """The converter called ``name`` (a ConversionError naming the choices otherwise)."""
    if name not in CONVERTERS:
        raise io.ConversionError(f"no converter {name!r}; expected one of {sorted(CONVERTERS)}")
    return CONVERTERS[name]


def for_component(name: str) -> Converter:
    """The converter of pipeline component ``name`` (:data:`unclip_jax.stages.COMPONENTS`): the one that converts the
    component's usual network class, preferring the converter of the same name (``super_res_last``)."""
    usual = stages.resolve(stages.component(name).modules[0])
    if name in CONVERTERS and usual in CONVERTERS[name].module_types:
        return CONVERTERS[name]
    for c in CONVERTERS.values():
        if usual in c.module_types:
            return c
    raise io.ConversionError(f"component {name!r}: no converter for {usual.__name__}")
