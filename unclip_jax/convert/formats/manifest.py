"""The manifest every export folder carries, and the checks made when one is loaded.

An export is only useful far from the code that wrote it, so it describes itself (``manifest.json``): the
format and its version, the network (class, constructor fields) and the diffusion it was trained with, its
inputs and outputs (names, shapes with the symbolic batch, dtypes), the unclip_jax version, and a SHA-256 of every
file it holds. Loading refuses a folder whose major format version it does not know, a file that is missing, or
one whose checksum differs: a half-copied or edited export is an error naming the file, never a silent wrong
answer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from unclip_jax.convert import io

MANIFEST = "manifest.json"
FORMAT_VERSION = "1.0"  # major.minor: a reader accepts any minor of its major


class ExportError(ValueError):
    """An export cannot be written or read (the message names the folder, file or field)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("unclip_jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_export(
    folder: str | os.PathLike, fmt: str, describe: Mapping[str, Any], write_files: Callable[[Path], None]
) -> Path:
    """Writes an export folder atomically: ``write_files(tmp)`` fills a temporary sibling, the manifest is added
    with the checksums of everything written, then the folder is renamed into place (replacing an old one only
    once the new one is complete). ``describe`` holds the format-independent part of the manifest."""
    with io.staged_folder(folder) as tmp:
        write_files(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "unclip_jax_version": _package_version(),
            **describe,
            "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return Path(folder)


def read_manifest(folder: str | os.PathLike, fmt: str | None = None, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export folder, checked: known major version, expected format, every file present with
    its recorded checksum (``verify``)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: no {MANIFEST} (not an unclip_jax export, or an unfinished copy)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ExportError(
            f"{path}: format_version {version!r} is not readable by this unclip_jax (it reads {FORMAT_VERSION[0]}.x)"
        )
    if fmt is not None and manifest.get("format") != fmt:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {fmt!r}")
    if verify:
        for name, digest in manifest.get("files", {}).items():
            f = folder / name
            if not f.is_file():
                raise ExportError(f"{folder}: {name} is missing (listed in {MANIFEST})")
            if sha256(f) != digest:
                raise ExportError(f"{folder}: {name} does not match its checksum in {MANIFEST} (damaged or edited)")
    return manifest
