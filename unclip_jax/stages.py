"""The stage registry: the one table of unCLIP's stages, pipeline components and training tasks.

unCLIP (Ramesh et al. 2022, section 2) is a cascade: a prior turns a caption into a CLIP image embedding, a decoder
turns the embedding into a 64x64 image and two diffusion upsamplers take it to 256 and 1024. Everything in the
package that needs a list of these — the train loop, the CLI, the pipeline loader, the converter, the bench, the
TPU planner — derives it from the three tables here; none names a stage itself.

- :data:`STAGES`: the **sampling stages** of the cascade, in order. Each has its default training diffusion (the
  ``config.diffusion`` fields of :func:`unclip_jax.diffusion.diffusion_from_config`: Karlo's schedulers, paper
  appendix C), its default sampling settings (Karlo's ``UnCLIPPipeline`` defaults; the paper's DDIM 15 for the
  256->1024 upsampler), its diffusers scheduler subfolder and its CLI flag prefix.
- :data:`COMPONENTS`: the **network folders** of a pipeline (diffusers' ``UnCLIPPipeline`` names plus ours): which
  stage each serves, its CLI path flag, and the network classes a native folder may hold for it.
- :data:`TASKS`: the **trainable tasks** of the one train loop: the network module, the Task factory, the input
  pipeline it reads, whether it tokenises captions, and the pipeline component it trains.

The module is a leaf (it imports nothing of the package): networks, factories and classes are named by dotted
path and resolved by the package that is allowed to import them (:func:`resolve`), so every layer may read the
registry without breaking the one-way dependency rule. A new stage is one row here, its network module and its
Task (README, "A new stage").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


def _frozen(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kw))


@dataclasses.dataclass(frozen=True)
class Stage:
    """A sampling stage of the cascade.

    Attributes:
      name: the stage's name (``Plan`` fields, ``settings`` keys, ``<name>_diffusion.json``).
      flag: CLI flag prefix (``--<flag>-steps``, ``--<flag>-sampler``, ...).
      scheduler: diffusers scheduler subfolder of a Karlo pipeline folder ('' = none: ours only).
      diffusion: default training diffusion as ``config.diffusion`` fields (used when a model folder does not say).
      steps, sampler, guidance_scale: default sampling settings (``StageSettings``); guidance None = unguided.
      guided: whether classifier-free guidance applies (the paper guides the prior and the decoder only).
    """

    name: str
    flag: str
    scheduler: str
    diffusion: Mapping[str, Any]
    steps: int
    sampler: str
    guidance_scale: float | None
    guided: bool


@dataclasses.dataclass(frozen=True)
class Component:
    """A network folder of a pipeline.

    Attributes:
      name: the subfolder name (diffusers' where it has one).
      stage: the sampling stage it serves ('' for the CLIP encoders).
      flag: CLI path flag (``--<flag> FOLDER``).
      modules: dotted class paths a native folder may hold for it (the first is the usual one).
    """

    name: str
    stage: str
    flag: str
    modules: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Task:
    """A trainable task of the train loop.

    Attributes:
      name: ``config.task.name``.
      network: the module of its network (``build(variant, **overrides)`` and ``VARIANTS``).
      factory: ``"module:function"``, ``function(config) -> Task`` (the train loop's Task protocol).
      input_stage: the grain pipeline it reads (:mod:`unclip_jax.input.pipelines`).
      tokenizer: whether its pipeline tokenises captions (CLIP trains on raw captions).
      component: the pipeline component its export serves.
      experiments: its experiment file(s) under ``experiments/``.
      diffusion: whether it trains a diffusion model (its config then starts from the default diffusion of the
        sampling stage its component serves).
    """

    name: str
    network: str
    factory: str
    input_stage: str
    tokenizer: bool
    component: str
    experiments: tuple[str, ...]
    diffusion: bool = True

    @property
    def stage(self) -> str:
        """The sampling stage its component serves ('' for the CLIP encoders)."""
        return component(self.component).stage


STAGES: tuple[Stage, ...] = (
    Stage(
        "prior", "prior", "prior_scheduler",
        _frozen(schedule="cosine", mean_type="x_start", var_type="fixed_small_log", clip_denoised=5.0),
        steps=25, sampler="ddpm", guidance_scale=4.0, guided=True,
    ),
    Stage(
        "decoder", "decoder", "decoder_scheduler",
        _frozen(schedule="cosine", mean_type="epsilon", var_type="learned_range", clip_denoised=1.0),
        steps=25, sampler="ddpm", guidance_scale=8.0, guided=True,
    ),
    Stage(
        "super_res", "super-res", "super_res_scheduler",
        _frozen(schedule="cosine", mean_type="epsilon", var_type="fixed_small_log", clip_denoised=1.0),
        steps=7, sampler="ddpm", guidance_scale=None, guided=False,
    ),
    Stage(
        "upsampler_1024", "upsampler-1024", "",
        _frozen(schedule="linear", mean_type="epsilon", var_type="fixed_small_log", clip_denoised=1.0),
        steps=15, sampler="ddim", guidance_scale=None, guided=False,
    ),
)  # fmt: skip

COMPONENTS: tuple[Component, ...] = (
    Component("text_encoder", "", "text-encoder", ("unclip_jax.models.clip:CLIPTextModel", "unclip_jax.models.clip:CLIP")),
    Component("prior", "prior", "prior", ("unclip_jax.models.prior:PriorTransformer", "unclip_jax.models.ar_prior:ARPrior")),
    Component("decoder", "decoder", "decoder", ("unclip_jax.models.decoder:UnCLIPDecoder",)),
    Component("super_res_first", "super_res", "super-res", ("unclip_jax.models.upsampler:SuperResUNet",)),
    Component("super_res_last", "super_res", "super-res-last", ("unclip_jax.models.upsampler:SuperResUNet",)),
    Component("upsampler_1024", "upsampler_1024", "upsampler-1024", ("unclip_jax.models.upsampler:SuperResUNet",)),
    Component("image_encoder", "", "image-encoder", ("unclip_jax.models.clip:CLIPVisionModel", "unclip_jax.models.clip:CLIP")),
)  # fmt: skip

TASKS: tuple[Task, ...] = (
    Task("clip", "unclip_jax.models.clip", "unclip_jax.train.tasks.clip:make_clip_task", "clip", True,
         "text_encoder", ("clip.py",), diffusion=False),
    Task("prior", "unclip_jax.models.prior", "unclip_jax.train.tasks.prior:make_prior_task", "prior", False,
         "prior", ("prior.py",)),
    Task("ar_prior", "unclip_jax.models.ar_prior", "unclip_jax.train.tasks.ar_prior:make_ar_prior_task", "prior",
         False, "prior", ("ar_prior.py",), diffusion=False),
    Task("decoder", "unclip_jax.models.decoder", "unclip_jax.train.tasks.decoder:make_decoder_task", "decoder",
         False, "decoder", ("decoder.py",)),
    Task("upsampler", "unclip_jax.models.upsampler", "unclip_jax.train.tasks.upsampler:make_upsampler_task",
         "upsampler", False, "super_res_first", ("upsampler.py", "upsampler_1024.py")),
    Task("decoder_inpaint", "unclip_jax.models.decoder",
         "unclip_jax.train.tasks.decoder_inpaint:make_decoder_inpaint_task", "decoder", False, "decoder",
         ("decoder_inpaint.py",)),
)  # fmt: skip

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
COMPONENT_NAMES: tuple[str, ...] = tuple(c.name for c in COMPONENTS)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
INPUT_STAGES: tuple[str, ...] = tuple(dict.fromkeys(t.input_stage for t in TASKS))


def _lookup(table: tuple[Any, ...], name: str, what: str) -> Any:
    for row in table:
        if row.name == name:
            return row
    raise ValueError(f"unknown {what} {name!r}; expected one of {[r.name for r in table]}")


def stage(name: str) -> Stage:
    """The :class:`Stage` called ``name`` (a one-line ``ValueError`` naming the choices otherwise)."""
    return _lookup(STAGES, name, "stage")


def component(name: str) -> Component:
    """The :class:`Component` called ``name``."""
    return _lookup(COMPONENTS, name, "component")


def task(name: str) -> Task:
    """The :class:`Task` called ``name`` (``config.task.name``)."""
    return _lookup(TASKS, name, "config.task.name")


def components_of(stage_name: str) -> tuple[Component, ...]:
    """The components that serve a sampling stage (e.g. ``super_res`` -> first and last)."""
    return tuple(c for c in COMPONENTS if c.stage == stage_name)


def resolve(path: str) -> Any:
    """Imports ``"package.module"`` or ``"package.module:attribute"`` (the registry's dotted references)."""
    module, _, attr = path.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod
