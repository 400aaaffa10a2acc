"""ArrayRecord shards: record codec, atomic shard commits, and reading a shard folder.

A shard folder (written by :mod:`unclip_jax.input.precompute` for both "prepare" and
"embed" jobs) holds::

    shard-00003-of-00010.array_record   records of items [3*S, 4*S) of the source
    shard-00003-of-00010.json           commit marker: counts, skips, embedding sums
    manifest.json                       written once every shard is committed

A shard counts as done only when its ``.json`` exists; both files are written to a
temporary name first and renamed (the ``.json`` last), so a job killed at any moment
leaves either a complete shard or none.

One record is one example, a ``dict[str, np.ndarray]`` serialised with ``np.savez``
(no pickle). Strings are stored as numpy unicode scalars, encoded images as uint8 byte
arrays. :func:`encode_record` / :func:`decode_record` are exact inverses.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import threading
from collections.abc import Iterable, Sequence

import numpy as np

SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.array_record$")
MANIFEST = "manifest.json"


# numpy parses each array's header with ``ast.literal_eval``; CPython < 3.11.9 / 3.12.1 can raise "SystemError: AST
# constructor recursion depth mismatch" when threads do that concurrently (CPython gh-106905), which the reader
# threads of the input pipelines do. Decoding is cheap next to the rest of a record's preprocessing.
_NPY_PARSE_LOCK = threading.Lock()


def encode_record(example: dict[str, object]) -> bytes:
    """dict of arrays / str / bytes / numbers -> bytes (``np.savez``, pickle disabled)."""
    arrays = {}
    for k, v in example.items():
        if isinstance(v, bytes | bytearray):
            v = np.frombuffer(bytes(v), dtype=np.uint8)
            k = k + ":bytes"
        elif isinstance(v, str):
            v = np.asarray(v, dtype=np.str_)
        arrays[k] = np.asarray(v)
        if arrays[k].dtype == object:
            raise TypeError(f"record field {k!r}: object arrays cannot be stored (got {type(v).__name__})")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, object]:
    """Inverse of :func:`encode_record`: str fields come back as ``str``, bytes as ``bytes``."""
    out: dict[str, object] = {}
    with _NPY_PARSE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
        for k in z.files:
            v = z[k]
            if k.endswith(":bytes"):
                out[k[: -len(":bytes")]] = v.tobytes()
            elif v.dtype.kind == "U" and v.ndim == 0:
                out[k] = str(v)
            else:
                out[k] = v
    return out


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def write_shard(folder: str, index: int, count: int, records: Iterable[bytes], meta: dict) -> str:
    """Writes one shard and its commit marker atomically (temp names + rename, marker last).

    Returns the path of the ``.array_record`` file.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.path.join(folder, shard_name(index, count))
    marker = path.removesuffix(".array_record") + ".json"
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    n = 0
    for r in records:
        writer.write(r)
        n += 1
    writer.close()
    meta = {**meta, "num_records": n, "file": os.path.basename(path)}
    with open(marker + f".tmp-{os.getpid()}", "w") as f:
        json.dump(meta, f)
    os.replace(tmp, path)
    os.replace(marker + f".tmp-{os.getpid()}", marker)
    return path


def committed_shards(folder: str) -> dict[int, dict]:
    """{shard index: its commit metadata} for every committed shard in ``folder``."""
    out = {}
    for path in glob.glob(os.path.join(folder, "shard-*-of-*.json")):
        with open(path) as f:
            meta = json.load(f)
        data = path.removesuffix(".json") + ".array_record"
        if os.path.exists(data):
            out[int(meta["shard_index"])] = meta
    return out


def shard_paths(folder: str) -> list[str]:
    """Committed shard files of a finished folder, in shard order.

    Raises:
      FileNotFoundError: no manifest (the job has not finished) or a shard is missing.
    """
    manifest = read_manifest(folder)
    paths = [os.path.join(folder, shard_name(i, manifest["num_shards"])) for i in range(manifest["num_shards"])]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: manifest lists {len(paths)} shards but {missing[:3]} are missing")
    return paths


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder!r} does not exist (prepare it with data/prepare_*.py first)")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: the job that writes {folder!r} has not finished (run it again to resume)"
        )
    with open(path) as f:
        return json.load(f)


class ShardReader:
    """Random access over the records of a finished shard folder (decoded dicts).

    Implements grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``).
    """

    def __init__(self, folder_or_paths: str | Sequence[str]):
        import grain.python as gp

        if isinstance(folder_or_paths, str):
            self.manifest = read_manifest(folder_or_paths)
            paths = shard_paths(folder_or_paths)
        else:
            self.manifest = {}
            paths = list(folder_or_paths)
        self.paths = paths
        self._source = gp.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, object]:
        return decode_record(self._source[index])

    def raw(self, index: int) -> bytes:
        return self._source[index]

    def __repr__(self) -> str:
        return f"ShardReader({len(self.paths)} shards, {len(self)} records)"
