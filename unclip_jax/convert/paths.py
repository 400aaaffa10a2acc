"""Checks of the paths a command is given, made before it loads a model or starts measuring (issue 22: a long run
must never end in an output it cannot write, nor start on an input that is not there).

Each check raises ``ValueError`` naming the flag and the path in one line; the ``unclip`` entry point
(:mod:`unclip_jax.cli`) prints it as ``unclip <command>: <message>`` with exit code 2. Writability is tested the only
reliable way, by creating a probe file where the output will go (permissions, read-only or full file systems, a file
where a folder should be), so the folders an output needs are created by the check, as the writer would.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _probe(folder: Path, flag: str, path: Path) -> None:
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{flag} {path}: cannot write there ({blocker} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unclip-", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from e


def check_input(path: str | os.PathLike, flag: str, kind: str = "folder") -> None:
    """Raises ValueError unless ``path`` exists and is a ``kind`` ("folder" or "file")."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such {kind}")
    if kind == "folder" and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, expected a folder")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file")


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Raises ValueError unless the folder ``path`` can be written: it is not a file, and files can be created in it
    (or, where it does not exist yet, beside it: atomic writers fill a temporary sibling first)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, expected a folder")
    _probe(path.absolute().parent, flag, path)
    if path.is_dir():
        _probe(path, flag, path)


def check_output_file(path: str | os.PathLike, flag: str, suffix: str | None = None) -> None:
    """Raises ValueError unless the file ``path`` (ending in ``suffix``, if given) can be written: not a folder, its
    folder can hold new files, an existing file is writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, expected a file name")
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: expected a {suffix} file")
    _probe(path.absolute().parent, flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: the file exists and is not writable")
