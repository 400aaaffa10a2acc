"""Our own on-disk format for a module and its variables (params-only exports, pipeline folders).

A native folder holds:
- ``config.json``: ``{"format": "unclip_jax", "format_version": 1, "module":
  "unclip_jax.models.prior.PriorTransformer", "variant": "karlo" | null, "kwargs": {...}}``
  where ``kwargs`` are the linen module's constructor fields (dtypes as names).
- ``params.safetensors``: the flattened variables with '/'-joined keys, e.g.
  ``params/proj_in/kernel``, ``stats/clip_mean``.

Written atomically through :func:`unclip_jax.convert.io.write_folder`. Only classes under
``unclip_jax.models`` are instantiated on load.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.convert import io
from unclip_jax.convert.mapping import flatten, unflatten

FORMAT = "unclip_jax"
FORMAT_VERSION = 1
WEIGHTS = "params.safetensors"
_SKIP_FIELDS = ("parent", "name")
_COLLECTIONS = ("params", "stats", "batch_stats")


def _is_dtype_field(name: str) -> bool:
    return name == "dtype" or name.endswith("_dtype")


def _to_json(name: str, value: Any) -> Any:
    if _is_dtype_field(name) and value is not None:
        return jnp.dtype(value).name
    if isinstance(value, Mapping):
        return {k: _to_json(k, v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_json(name, v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise io.ConversionError(f"save_native: module field {name!r}={value!r} is not JSON-serialisable")


def _from_json(name: str, value: Any) -> Any:
    if _is_dtype_field(name) and isinstance(value, str):
        # jnp.float32 etc. (the scalar types the variant tables use), so that a reloaded module is equal to *and
        # hashes like* the one that was saved (jit caches keyed on the module would otherwise miss).
        return getattr(jnp, value, None) or jnp.dtype(value)
    if isinstance(value, Mapping):
        return {k: _from_json(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_from_json(name, v) for v in value)
    return value


def module_kwargs(module: nn.Module) -> dict[str, Any]:
    """The constructor fields of a linen module (without parent/name), JSON-ready."""
    return {
        f.name: _to_json(f.name, getattr(module, f.name))
        for f in dataclasses.fields(module)
        if f.init and f.name not in _SKIP_FIELDS
    }


def as_variables(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Accepts a variables dict ({'params': ..., ...}) or a bare params tree; returns variables, unboxed."""
    tree = nn.unbox(dict(tree))
    if "params" in tree and all(k in _COLLECTIONS for k in tree):
        return dict(tree)
    return {"params": tree}


def save_native(
    module: nn.Module,
    variables: Mapping[str, Any],
    folder: str | os.PathLike,
    variant: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Writes ``module`` + ``variables`` (or a bare params tree) to ``folder`` atomically.

    Args:
      module: the linen module (its fields are stored as ``kwargs``).
      variables: {'params': ..., 'stats': ...} or a params tree.
      folder: destination (replaced only when the new folder is complete).
      variant: the variant name the module came from, recorded for humans.
      extra_files: more text files (name -> content) written into the folder in the same atomic step,
        e.g. the ``diffusion.json`` a training export leaves for the pipeline.
    """
    cls = type(module)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "module": f"{cls.__module__}.{cls.__qualname__}",
        "variant": variant,
        "kwargs": module_kwargs(module),
    }
    flat = flatten(as_variables(variables))
    tensors = {"/".join(k): np.asarray(jax.device_get(v)) for k, v in flat.items()}
    return io.write_folder(folder, config, tensors, weights_name=WEIGHTS, extra_files=extra_files)


def load_native(
    folder: str | os.PathLike, packages: tuple[str, ...] = ("unclip_jax.models",)
) -> tuple[nn.Module, dict[str, Any]]:
    """Reads a folder written by :func:`save_native`.

    Args:
      folder: the native folder.
      packages: the packages whose module classes may be instantiated (the networks by default; a caller that
        saved a module of its own, e.g. the demo's attribute classifier, names its package).

    Returns:
      (module, variables) with variables = {'params': ..., maybe 'stats': ...} of jnp arrays.

    Raises:
      ConversionError: naming the folder and the bad field.
    """
    folder = Path(folder)
    config = io.read_config(folder)
    io.require_fields(config, ["format", "format_version", "module", "kwargs"], str(folder / io.CONFIG))
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise io.ConversionError(
            f"{folder / io.CONFIG}: format {config['format']!r} v{config['format_version']}, "
            f"expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    path = config["module"]
    mod_name, _, cls_name = path.rpartition(".")
    if not any(mod_name == p or mod_name.startswith(p + ".") for p in packages):
        raise io.ConversionError(f"{folder / io.CONFIG}: module {path!r} is not under {' or '.join(packages)}")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise io.ConversionError(f"{folder / io.CONFIG}: module {path!r} not found ({e})") from e
    kwargs = {k: _from_json(k, v) for k, v in config["kwargs"].items()}
    try:
        module = cls(**kwargs)
    except TypeError as e:
        raise io.ConversionError(f"{folder / io.CONFIG}: kwargs do not fit {path} ({e})") from e
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise io.ConversionError(f"{weights}: missing")
    tensors = io.read_safetensors(weights)  # bf16/f16 come back as float32: restore the stored dtypes
    stored = _stored_dtypes(weights)
    variables = unflatten(
        {tuple(k.split("/")): jnp.asarray(v, dtype=stored.get(k, v.dtype)) for k, v in tensors.items()}
    )
    return module, variables


def _stored_dtypes(path: Path) -> dict[str, Any]:
    """The half-precision dtypes recorded in a safetensors header ({key: dtype})."""
    import json

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    half = {"BF16": jnp.bfloat16, "F16": jnp.float16}
    return {k: half[v["dtype"]] for k, v in header.items() if k != "__metadata__" and v["dtype"] in half}


def is_native(folder: str | os.PathLike) -> bool:
    """True when ``folder/config.json`` is one of ours (written by :func:`save_native`)."""
    cfg = Path(folder) / io.CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def resolve_component_folder(folder: str | os.PathLike, component: str) -> Path:
    """A component folder itself, or ``folder/component`` when ``folder`` is a whole pipeline folder."""
    folder = Path(folder)
    sub = folder / component
    if not (folder / io.CONFIG).is_file() and (sub / io.CONFIG).is_file():
        return sub
    if (folder / "model_index.json").is_file() and (sub / io.CONFIG).is_file():
        return sub
    return folder
