"""Assembling an :class:`~unclip_jax.pipeline.cascade.UnclipPipeline` from folders on disk.

A component may come from any of:

- a **training workdir** (``WORKDIR/export/ema``, or the newest ``WORKDIR/export/ema_<step>``): the params-only
  export of the EMA weights that the train loop writes (`unclip_jax.convert.native` format; ``train`` is never
  imported here);
- a **native folder** (``config.json`` with ``"format": "unclip_jax"`` + ``params.safetensors``), e.g. written by
  ``unclip convert import``;
- a **diffusers / transformers folder** in the Karlo layout (``karlo-diffusers-layout.md``): a component folder, or a
  whole pipeline folder whose ``prior/``, ``decoder/`` + ``text_proj/``, ``super_res_first/``, ``super_res_last/``,
  ``text_encoder/``, ``image_encoder/``, ``tokenizer/`` and ``*_scheduler/`` subfolders are used.

``load_pipeline(model_dir, **component_paths)`` looks each component up in ``model_dir/<name>`` unless a path is
given for it; a required component that is found nowhere is an error naming it and the places searched.

**Prior kinds.** The ``prior`` component is either the diffusion prior (``PriorTransformer``, native or diffusers) or
the autoregressive prior (`unclip_jax.models.ar_prior.ARPrior`, native only: a training workdir of
``experiments/ar_prior.py`` or a native folder; its fitted PCA codec is in the ``stats`` collection). Which one a
folder holds is read from its ``config.json`` (the module class), so ``--prior PATH`` takes either. ``prior_kind``
(``"auto"`` | ``"diffusion"`` | ``"ar"``) asserts the kind; with ``"ar"`` and no explicit path the model folder's
``ar_prior/`` subfolder is tried before ``prior/`` (a model folder may hold both priors).

The training diffusion of a stage is read from a ``diffusion.json`` beside a native component (the fields of
``config.diffusion``) or from a diffusers ``<stage>_scheduler/scheduler_config.json`` (``UnCLIPScheduler``,
translated by `unclip_jax.convert.scheduler`), both through `unclip_jax.diffusion.diffusion_from_config`; otherwise
the stage registry's default (`unclip_jax.stages.STAGES`, Karlo's schedulers) is used.

Which components exist, which stage each serves, which network classes a folder may hold for it and its scheduler
subfolder all come from `unclip_jax.stages`; each diffusers / transformers folder is read by its converter
(`unclip_jax.convert.registry`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unclip_jax import stages
from unclip_jax.convert import io, registry
from unclip_jax.convert.native import is_native, load_native
from unclip_jax.convert.pipeline import NATIVE_FILES
from unclip_jax.convert.scheduler import SCHEDULER_CONFIG, diffusion_config
from unclip_jax.diffusion import GaussianDiffusion, diffusion_from_config
from unclip_jax.input.tokenizer import EOT, TOKENIZER_KINDS, ClipTokenizer, FolderTokenizer
from unclip_jax.pipeline import priors
from unclip_jax.pipeline.cascade import Component, UnclipPipeline

log = logging.getLogger("unclip_jax.pipeline")

COMPONENTS = stages.COMPONENT_NAMES
TWO_TOWER_CLIP = "clip"  # a model-folder subfolder (transformers CLIPModel) that serves as text and image encoder
PRIOR_KIND_CHOICES = ("auto", "diffusion", "ar")
AR_PRIOR_FOLDER = "ar_prior"  # model-folder subfolder tried first for prior_kind="ar"


class PipelineLoadError(ValueError):
    """A component of the cascade is missing or unreadable (the message names it)."""


def _is_two_tower_clip(folder: Path) -> bool:
    """A transformers ``CLIPModel`` folder (both towers; ``model_type: clip``), whatever its name."""
    try:
        return json.loads((folder / io.CONFIG).read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return folder.name == "clip"


def workdir_export(folder: str | os.PathLike) -> Path | None:
    """The params-only export of a training workdir: ``export/ema`` or the newest ``export/ema_<step>``."""
    export = Path(folder) / "export"
    if (export / "ema" / io.CONFIG).is_file():
        return export / "ema"
    steps = []
    if export.is_dir():
        for p in export.iterdir():
            m = re.fullmatch(r"ema_(\d+)", p.name)
            if m and (p / io.CONFIG).is_file():
                steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def _check_type(name: str, module: Any, where: Path) -> None:
    allowed = stages.component(name).modules
    if not isinstance(module, tuple(stages.resolve(p) for p in allowed)):
        expected = [p.rpartition(":")[2] for p in allowed]
        raise PipelineLoadError(f"{name}: {where} holds a {type(module).__name__}, expected one of {expected}")


def _torch_folder(name: str, folder: Path) -> tuple[registry.Converter, Path] | None:
    """The converter and the path it reads when ``folder`` holds component ``name`` in diffusers / transformers
    layout (None when it does not)."""
    c = registry.for_component(name)
    if len(c.folders) > 1:  # the decoder: decoder/ (UNet2DConditionModel) + text_proj/ side by side
        root = folder.parent if folder.name == name else folder
        return (c, root) if all((root / f / io.CONFIG).is_file() for f in c.folders) else None
    if not (folder / io.CONFIG).is_file():
        return None
    if name in ("text_encoder", "image_encoder") and _is_two_tower_clip(folder):
        c = registry.converter(TWO_TOWER_CLIP)
    return c, folder


def _candidates(name: str, path: Path, own_folder: bool) -> list[Path]:
    """Folders that may hold component ``name``: a workdir export, the folder itself, a pipeline subfolder."""
    base = path if own_folder else path / name
    out = []
    exp = workdir_export(base)
    if exp is not None:
        out.append(exp)
    out.append(base)
    if own_folder:
        out.append(base / name)  # a whole pipeline folder given for one component
    if name in ("text_encoder", "image_encoder"):
        out.append(path / TWO_TOWER_CLIP)  # a two-tower CLIP serves as both
    return out


def load_component(name: str, path: str | os.PathLike, *, own_folder: bool = False) -> tuple[Component, Path]:
    """Loads component ``name`` from ``path`` (workdir, native folder, diffusers folder or pipeline folder).

    Args:
        name: one of :data:`COMPONENTS`.
        path: where to look.
        own_folder: ``path`` was given for this component explicitly (so a config.json there must be it).

    Returns:
        (Component, the folder it was read from).

    Raises:
        PipelineLoadError: nothing loadable found, naming the component and the folders searched.
    """
    if name not in COMPONENTS:
        raise PipelineLoadError(f"unknown component {name!r}; expected one of {COMPONENTS}")
    path = Path(path)
    report_leftovers(path)
    searched = []
    for folder in _candidates(name, path, own_folder):
        if folder in searched:
            continue
        searched.append(folder)
        try:
            if is_native(folder):
                module, variables = load_native(folder)
                _check_type(name, module, folder)
                check_finite(name, variables, folder)
                return Component(module, dict(variables)), folder
            found = _torch_folder(name, folder)
            if found is not None:
                c, where = found
                module, variables = c.load(where)
                check_finite(name, variables, where)
                return Component(module, dict(variables)), where
        except io.ConversionError as e:
            raise PipelineLoadError(f"{name}: cannot read {folder}: {e}") from e
    raise PipelineLoadError(
        f"{name}: no component found; searched {[str(s) for s in searched]} (expected a training workdir with "
        "export/ema, a native folder (unclip convert import) or a diffusers/transformers folder)"
    )


def report_leftovers(folder: Path) -> list[Path]:
    """Warns about what an interrupted write left beside ``folder`` or inside it: ``.<name>.tmp-*`` (a partial
    export) and ``.<name>.old-*`` (a replaced one) folders of `unclip_jax.convert.io.staged_folder`, which are
    never read and may be large. Returns them."""
    found = []
    for parent in (folder.parent, folder):
        if parent.is_dir():
            found += sorted(
                p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
            )
    for p in found:
        if p not in _REPORTED:
            _REPORTED.add(p)
            log.warning("%s: left by an interrupted or replaced export; nothing reads it (safe to delete)", p)
    return found


_REPORTED: set[Path] = set()  # one warning per leftover and process


def check_finite(name: str, variables: Mapping[str, Any], folder: Path) -> None:
    """Refuses weights holding NaN/inf (a damaged file or a diverged run would sample black images).

    Raises:
        PipelineLoadError: naming the component, the folder and the first non-finite array.
    """
    import numpy as np

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, Mapping):
            for k, v in tree.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
            return
        x = np.asarray(tree)
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise PipelineLoadError(
                f"{name}: {folder} holds non-finite weights ({prefix}: {bad} of {x.size} values are NaN/inf); "
                "re-export them from a good checkpoint"
            )

    walk(variables, "")


def _load_prior(
    path: Path | None, root: Path | None, kind: str
) -> tuple[Component | None, Path | None, PipelineLoadError | None]:
    """The prior from an explicit ``path`` or the model folder ``root`` (see the module docstring), kind-checked."""
    if kind not in PRIOR_KIND_CHOICES:
        raise PipelineLoadError(f"prior_kind={kind!r}: expected one of {PRIOR_KIND_CHOICES}")
    comp = folder = None
    if path is not None:
        comp, folder = load_component("prior", path, own_folder=True)
    elif root is None:
        return None, None, PipelineLoadError("prior: no model directory and no path given for it")
    else:
        first_error = None
        if kind == "ar" and (root / AR_PRIOR_FOLDER).exists():
            comp, folder = load_component("prior", root / AR_PRIOR_FOLDER, own_folder=True)
        else:
            try:
                comp, folder = load_component("prior", root)
            except PipelineLoadError as e:
                first_error = e
        if comp is None:
            return None, None, first_error
    found = priors.prior_kind(comp.module)
    if kind != "auto" and found != kind:
        hint = f" (or put it in {root / AR_PRIOR_FOLDER})" if kind == "ar" and path is None and root else ""
        raise PipelineLoadError(
            f"prior: {folder} holds a {type(comp.module).__name__} (a {found} prior), but prior kind {kind!r} was "
            f"asked for; give the {kind} prior's folder with --prior PATH{hint} or use --prior-kind auto"
        )
    return comp, folder, None


def _read_diffusion(path: Path, scheduler: bool) -> GaussianDiffusion:
    """The diffusion of a ``diffusion.json`` or (``scheduler``) of a diffusers ``scheduler_config.json``."""
    try:
        config = json.loads(path.read_text())
        if scheduler:
            config = diffusion_config(config, str(path))
        return diffusion_from_config(config, str(path))
    except ValueError as e:  # bad JSON, an unsupported scheduler option, a bad diffusion field
        raise PipelineLoadError(str(e) if str(path) in str(e) else f"{path}: {e}") from e


def find_diffusion(stage: str, component_folder: Path | None, model_dir: Path | None) -> GaussianDiffusion:
    """The training diffusion of ``stage`` (see the module docstring for where it is looked up)."""
    places = []
    if component_folder is not None:
        places += [component_folder / "diffusion.json", component_folder.parent / f"{stage}_diffusion.json"]
    if model_dir is not None:
        places.append(model_dir / f"{stage}_diffusion.json")
    for p in places:
        if p.is_file():
            return _read_diffusion(p, scheduler=False)
    sched = stages.stage(stage).scheduler
    roots = _with_native_files(
        [r for r in (model_dir, component_folder.parent if component_folder else None) if r is not None]
    )
    for root in roots:
        if sched and (root / sched / SCHEDULER_CONFIG).is_file():
            return _read_diffusion(root / sched / SCHEDULER_CONFIG, scheduler=True)
    return diffusion_from_config(stages.stage(stage).diffusion, f"stages.stage({stage!r}).diffusion")


def _with_native_files(roots: Sequence[Path | None]) -> list[Path]:
    """``roots`` followed by their ``files/`` folders: a native pipeline folder (``unclip convert import --component
    pipeline``) keeps the diffusers scheduler and tokenizer files there."""
    roots = [r for r in roots if r is not None]
    return roots + [r / NATIVE_FILES for r in roots if (r / NATIVE_FILES).is_dir()]


def load_tokenizer(
    model_dir: Path | None, text_encoder_folder: Path | None, kind: str = "openai"
) -> ClipTokenizer | FolderTokenizer:
    """The caption tokenizer: ``"openai"``, our offline CLIP BPE with OpenAI's text cleaning (the pad token
    follows ``tokenizer/tokenizer_config.json`` when present, default "!"), or ``"folder"``, the transformers
    ``CLIPTokenizer`` of the folder's ``tokenizer/`` (what diffusers' ``UnCLIPPipeline`` runs)."""
    if kind not in TOKENIZER_KINDS:
        raise PipelineLoadError(f"tokenizer {kind!r}: expected one of {TOKENIZER_KINDS}")
    roots = _with_native_files([model_dir, text_encoder_folder.parent if text_encoder_folder else None])
    found = next((r / "tokenizer" for r in roots if (r / "tokenizer" / "tokenizer_config.json").is_file()), None)
    if kind == "folder":
        if found is None:
            raise PipelineLoadError(
                f"tokenizer 'folder': no tokenizer/tokenizer_config.json in {[str(r) for r in roots]}"
            )
        return FolderTokenizer(found)
    pad = "!"
    if found is not None:
        token = json.loads((found / "tokenizer_config.json").read_text()).get("pad_token", "!")
        token = token.get("content", "!") if isinstance(token, dict) else token
        pad = EOT if token == EOT else "!"
    return ClipTokenizer(pad_token=pad)


def load_pipeline(
    model_dir: str | os.PathLike | None = None,
    *,
    paths: Mapping[str, str | os.PathLike | None] | None = None,
    require: Sequence[str] = ("text_encoder", "decoder"),
    tokenizer: Any = None,
    prior_kind: str = "auto",
    tokenizer_kind: str = "openai",
) -> UnclipPipeline:
    """Builds an :class:`UnclipPipeline` from a model folder and/or per-component paths.

    Args:
        model_dir: a pipeline folder (diffusers Karlo layout, or native components in subfolders named as
            :data:`COMPONENTS`; a two-tower ``clip/`` serves as text and image encoder). May be None when every
            needed component has a path.
        paths: component name -> folder (training workdir, native folder, diffusers component folder).
        require: components that must be found (others are loaded when present).
        tokenizer: override of the tokenizer (default: :func:`load_tokenizer` of ``tokenizer_kind``).
        tokenizer_kind: ``"openai"`` (default) or ``"folder"`` (see :func:`load_tokenizer`).
        prior_kind: ``"auto"`` (whatever the prior folder holds), ``"diffusion"`` or ``"ar"``; a prior of another
            kind is an error. ``"ar"`` without a prior path looks in ``model_dir/ar_prior`` before
            ``model_dir/prior``.

    Raises:
        PipelineLoadError: a required component is missing (its name and the places searched are given).
    """
    root = Path(model_dir) if model_dir is not None else None
    paths = {k: v for k, v in (paths or {}).items() if v is not None}
    unknown = set(paths) - set(COMPONENTS)
    if unknown:
        raise PipelineLoadError(f"unknown components {sorted(unknown)}; expected some of {COMPONENTS}")
    missing = [n for n in require if n not in COMPONENTS]
    if missing:
        raise PipelineLoadError(f"require: unknown components {missing}")
    loaded: dict[str, Component | None] = {}
    folders: dict[str, Path | None] = {}
    for name in COMPONENTS:
        comp, folder, error = None, None, None
        try:
            if name == "prior":
                comp, folder, error = _load_prior(Path(paths["prior"]) if "prior" in paths else None, root, prior_kind)
            elif name in paths:
                comp, folder = load_component(name, paths[name], own_folder=True)
            elif root is not None:
                comp, folder = load_component(name, root)
            else:
                error = PipelineLoadError(f"{name}: no model directory and no path given for it")
        except PipelineLoadError as e:
            if name in paths or (name == "prior" and prior_kind != "auto"):
                raise
            error = e
        if comp is None and name in require:
            raise error or PipelineLoadError(f"{name}: not found")
        loaded[name], folders[name] = comp, folder
    diffusions = {}
    for c in stages.COMPONENTS:
        comp = loaded.get(c.name)
        if not c.stage or comp is None or c.stage in diffusions:
            continue
        if c.name == "prior" and priors.prior_kind(comp.module) == "ar":
            continue  # the autoregressive prior has no diffusion
        diffusions[c.stage] = find_diffusion(c.stage, folders[c.name], root)
    tok = tokenizer or load_tokenizer(root, folders.get("text_encoder"), tokenizer_kind)
    return UnclipPipeline(tok, diffusions=diffusions, **loaded)
