"""Reading and writing PyTorch-keyed safetensors folders (diffusers / transformers layout).

A component folder holds ``config.json`` and one weights file
(``diffusion_pytorch_model.safetensors`` for diffusers, ``model.safetensors`` for
transformers). Only safetensors are read: never pickle, never remote code.

Writes are atomic at the folder level: everything is written into a temporary sibling
folder which is renamed into place only once complete, so an interrupted export never
leaves a folder that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# The library versions written into exported configs (the versions the parity tests run against).
DIFFUSERS_VERSION = "0.42.1"
TRANSFORMERS_VERSION = "5.23.0"


class ConversionError(ValueError):
    """A weight folder does not match what the architecture expects."""


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Reads ``folder/config.json``; a missing or unparsable file is a ConversionError."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConversionError(f"{path}: missing (every component folder needs a config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def require_fields(config: Mapping[str, Any], fields: list[str], where: str) -> None:
    """Raises a ConversionError naming every field of ``fields`` missing from ``config``."""
    missing = [f for f in fields if f not in config]
    if missing:
        raise ConversionError(f"{where}: config.json lacks required field(s) {missing}")


def build_module(cls: type, kwargs: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> Any:
    """``cls(**kwargs, **overrides)``; fields the class rejects are a ConversionError naming ``where``."""
    try:
        return cls(**{**kwargs, **overrides})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from e


def find_weights(folder: str | os.PathLike) -> Path:
    """Returns the single safetensors weights file of a component folder."""
    folder = Path(folder)
    for name in (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return folder / found[0]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (
        f" (found pickle files {pickles}; convert them to safetensors first: pickle is never loaded)" if pickles else ""
    )
    raise ConversionError(f"{folder}: expected one safetensors weights file, found {found or 'none'}{hint}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads every tensor of a safetensors file as numpy; bf16/f16 tensors are upcast to float32."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                a = np.asarray(f.get_tensor(k))
                out[k] = a.astype(np.float32) if a.dtype.name in ("bfloat16", "float16") else a
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    return out


def write_folder(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    weights_name: str = DIFFUSERS_WEIGHTS,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Atomically writes ``config.json`` + a safetensors file (``format: pt``) to ``folder`` (:func:`staged_folder`)."""
    from safetensors.numpy import save_file

    with staged_folder(folder) as tmp:
        arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
        save_file(arrays, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return Path(folder)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Every writer's atomic folder: yields a temporary sibling of ``folder`` to fill; when the block ends without
    error it replaces ``folder`` (an existing one only once the new one is complete), with the permissions the
    umask gives any new file; on error (or a kill signal raised as an exception) the partial folder is removed.
    So no half-written folder ever stands under the destination's name."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_dir(src: Path, dst: Path) -> None:
    """Moves the complete folder ``src`` to ``dst``, replacing ``dst`` if it exists.

    ``src`` (a ``mkdtemp`` folder, 0700) first gets the umask's permissions, as any file a tool writes.
    """
    mode = 0o777 & ~_umask()
    for p in [src, *src.rglob("*")]:
        os.chmod(p, mode if p.is_dir() else mode & 0o666)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / dst.name)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
