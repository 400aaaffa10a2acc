"""A whole diffusers ``UnCLIPPipeline`` folder (Karlo layout) <-> our modules and variables.

:func:`read_diffusers_pipeline` imports such a folder (``unclip convert import --component pipeline``),
:func:`write_diffusers_pipeline` exports one; :func:`save_native_bundle` / :func:`load_native_bundle` keep the same
bundle as native folders. (Loading a pipeline *for sampling*, from any mix of folders, is
:func:`unclip_jax.pipeline.loading.load_pipeline`.) Networks, each through its converter
(:func:`unclip_jax.convert.registry.for_component`):

=================  ==========================================  ====================================
name               folder(s)                                   module
=================  ==========================================  ====================================
prior              ``prior/``                                  ``models.prior.PriorTransformer``
text_encoder       ``text_encoder/``                           ``models.clip.CLIPTextModel``
decoder            ``decoder/`` + ``text_proj/``               ``models.decoder.UnCLIPDecoder``
super_res_first    ``super_res_first/``                        ``models.upsampler.SuperResUNet``
super_res_last     ``super_res_last/``                         ``models.upsampler.SuperResUNet``
=================  ==========================================  ====================================

Everything else (``model_index.json``, the three ``*_scheduler/scheduler_config.json`` and the
``tokenizer/`` files) is carried verbatim as text in :attr:`UnCLIPBundle.files`, so an
import followed by an export reproduces the folder (tensors bit for bit). Missing
scheduler configs / ``model_index.json`` are generated on export (Karlo's schedulers are the stage registry's
default diffusions, :func:`unclip_jax.convert.scheduler.karlo_scheduler_configs`);
the tokenizer files must be present.

diffusers 0.42.1 keeps ``UnCLIPPipeline`` under ``diffusers.pipelines.deprecated``; call
:func:`register_diffusers_aliases` before ``UnCLIPPipeline.from_pretrained`` there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn

from unclip_jax import stages
from unclip_jax.convert import io, registry
from unclip_jax.convert.native import load_native, save_native
from unclip_jax.convert.scheduler import SCHEDULER_CLASS, SCHEDULER_CONFIG, karlo_scheduler_configs

MODEL_INDEX = "model_index.json"
# The networks of diffusers' UnCLIPPipeline, as pipeline components (each read and written by its converter,
# registry.for_component).
NETWORKS = ("prior", "text_encoder", "decoder", "super_res_first", "super_res_last")
SCHEDULERS = tuple(s.scheduler for s in stages.STAGES if s.scheduler)
TOKENIZER = "tokenizer"
TEXT_DIRS = (*SCHEDULERS, TOKENIZER)


def model_index_classes() -> dict[str, list[str]]:
    """The ``model_index.json`` entries of Karlo's pipeline folder: every network folder, scheduler and tokenizer."""
    out = {}
    for name in NETWORKS:
        for folder in registry.for_component(name).folders:
            out[folder] = registry.converter(folder).index_entry
    out.update({sched: ["diffusers", SCHEDULER_CLASS] for sched in SCHEDULERS})
    out[TOKENIZER] = ["transformers", "CLIPTokenizer"]
    return out


@dataclasses.dataclass
class UnCLIPBundle:
    """The networks of an unCLIP pipeline plus the pipeline's non-weight files.

    Attributes:
      models: name (see :data:`NETWORKS`) -> (module, variables).
      files: relative path -> text (``model_index.json``, scheduler configs, tokenizer files).
    """

    models: dict[str, tuple[nn.Module, dict[str, Any]]]
    files: dict[str, str] = dataclasses.field(default_factory=dict)


def read_diffusers_pipeline(folder: str | os.PathLike, **overrides: Any) -> UnCLIPBundle:
    """Imports every network of a diffusers ``UnCLIPPipeline`` folder.

    Args:
      folder: the pipeline folder (with ``model_index.json``).
      **overrides: module fields applied to every network (e.g. ``dtype=jnp.bfloat16``).

    Returns:
      An :class:`UnCLIPBundle`.

    Raises:
      ConversionError: naming the missing/bad component folder or file.
    """
    folder = Path(folder)
    index = folder / MODEL_INDEX
    if not index.is_file():
        raise io.ConversionError(f"{index}: missing (not a diffusers pipeline folder)")
    try:
        cfg = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise io.ConversionError(f"{index}: not valid JSON ({e})") from e
    if cfg.get("_class_name") not in ("UnCLIPPipeline", None):
        raise io.ConversionError(f"{index}: _class_name={cfg.get('_class_name')!r}, expected 'UnCLIPPipeline'")
    converters = {name: registry.for_component(name) for name in NETWORKS}
    needed = [*(f for c in converters.values() for f in c.folders), TOKENIZER]
    missing = [n for n in needed if not (folder / n).is_dir()]
    if missing:
        raise io.ConversionError(f"{folder}: pipeline component folder(s) {missing} missing")
    models = {name: c.load(c.pipeline_path(folder), **overrides) for name, c in converters.items()}
    files = {MODEL_INDEX: index.read_text()}
    for sub in TEXT_DIRS:
        for path in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else []:
            if path.is_file():
                try:
                    files[str(path.relative_to(folder))] = path.read_text()
                except UnicodeDecodeError as e:
                    raise io.ConversionError(f"{path}: not a text file ({e})") from e
    return UnCLIPBundle(models=models, files=files)


def default_files() -> dict[str, str]:
    """``model_index.json`` and Karlo's three scheduler configs (everything but the tokenizer)."""
    index = {"_class_name": "UnCLIPPipeline", "_diffusers_version": io.DIFFUSERS_VERSION, **model_index_classes()}
    files = {MODEL_INDEX: json.dumps(index, indent=2, sort_keys=True) + "\n"}
    for name, cfg in karlo_scheduler_configs().items():
        files[f"{name}/{SCHEDULER_CONFIG}"] = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    return files


def write_diffusers_pipeline(bundle: UnCLIPBundle, folder: str | os.PathLike) -> Path:
    """Exports a bundle to a folder diffusers' ``UnCLIPPipeline.from_pretrained`` loads (atomic).

    The folder is assembled in a temporary sibling and renamed into place when complete.
    """
    folder = Path(folder)
    missing = [n for n in NETWORKS if n not in bundle.models]
    if missing:
        raise io.ConversionError(f"write_diffusers_pipeline: networks {missing} missing from the bundle")
    files = {**default_files(), **bundle.files}
    if not any(k.startswith("tokenizer/") for k in files):
        raise io.ConversionError(
            "write_diffusers_pipeline: the bundle has no tokenizer/ files (copy them from a CLIP folder)"
        )
    with io.staged_folder(folder) as tmp:
        for name in NETWORKS:
            module, variables = bundle.models[name]
            c = registry.for_component(name)
            c.save(module, variables, c.pipeline_path(tmp))
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
    return folder


def register_diffusers_aliases() -> None:
    """Lets diffusers 0.42.1 load an ``UnCLIPPipeline`` folder, ours or Karlo's.

    diffusers 0.42.1 keeps unCLIP under ``diffusers.pipelines.deprecated.unclip``: a folder saved by it (and by
    :func:`write_diffusers_pipeline`) names ``text_proj`` as ``["diffusers", "UnCLIPTextProjModel"]``, a class
    the top-level package no longer exports, and the original Karlo folder names it ``["unclip", ...]``, a
    pipeline module that no longer exists. This makes both names resolve to the deprecated module's class.
    Harmless on versions that have them.
    """
    import sys

    import diffusers
    import diffusers.pipelines
    import diffusers.pipelines.deprecated.unclip as unclip

    sys.modules.setdefault("diffusers.pipelines.unclip", unclip)
    if not hasattr(diffusers.pipelines, "unclip"):
        diffusers.pipelines.unclip = unclip
    if not hasattr(diffusers, "UnCLIPTextProjModel"):
        diffusers.UnCLIPTextProjModel = unclip.UnCLIPTextProjModel


NATIVE_FILES = "files"


def save_native_bundle(bundle: UnCLIPBundle, folder: str | os.PathLike) -> Path:
    """Writes a bundle in the native format: ``folder/<network>/`` (native folders) + ``folder/files/``.

    Atomic like every writer here: assembled in a temporary sibling, renamed when complete.
    """
    folder = Path(folder)
    missing = [n for n in NETWORKS if n not in bundle.models]
    if missing:
        raise io.ConversionError(f"save_native_bundle: networks {missing} missing from the bundle")
    with io.staged_folder(folder) as tmp:
        for name in NETWORKS:
            module, variables = bundle.models[name]
            save_native(module, variables, tmp / name)
        for rel, text in bundle.files.items():
            (tmp / NATIVE_FILES / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / NATIVE_FILES / rel).write_text(text)
    return folder


def load_native_bundle(folder: str | os.PathLike) -> UnCLIPBundle:
    """Reads a folder written by :func:`save_native_bundle`; a missing network is an error naming it."""
    folder = Path(folder)
    missing = [n for n in NETWORKS if not (folder / n).is_dir()]
    if missing:
        raise io.ConversionError(f"{folder}: native pipeline network folder(s) {missing} missing")
    models = {name: load_native(folder / name) for name in NETWORKS}
    root = folder / NATIVE_FILES
    files = {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
    return UnCLIPBundle(models=models, files=files)
