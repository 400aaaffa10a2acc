"""What the resumable steps of the MS-COCO protocol share: atomic files, identities, hosts and fixed-size batches.

- Files are written atomically (a temporary name in the same folder, then ``os.replace``), so a killed run never
  leaves a half-written shard or report under its final name.
- A folder's identity (:func:`folder_identity`) is the sha256 of every weight and config file; a run's identity file
  is written once and compared on resumption (:func:`check_or_write_identity`).
- Process 0 writes shared files; :func:`barrier` syncs the hosts of a multi-host run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin", ".npz", ".pt", ".pth", ".json")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path and sha256 of every weight/config file of a component folder (a workdir: of its params-only export).

    Returns:
        ``{"path", "files": {relative path: sha256}, "sha256": hash of the sorted (path, hash) list}``.
    """
    from unclip_jax.pipeline.loading import workdir_export

    path = Path(path).resolve()
    root = workdir_export(path) or path
    files = {}
    if root.is_file():
        files[root.name] = sha256_file(root)
    elif root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."):
                files[str(p.relative_to(root))] = sha256_file(p)
    else:
        raise FileNotFoundError(f"model identity: {path} does not exist")
    combined = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"path": str(path), "read_from": str(root), "files": files, "sha256": combined}


def model_identity(
    model_dir: str | os.PathLike | None, paths: Mapping[str, str | os.PathLike | None] | None = None
) -> dict[str, Any]:
    """Identity of a pipeline: the model folder and every per-component path, each with its file hashes."""
    out: dict[str, Any] = {}
    if model_dir is not None:
        out["model_dir"] = folder_identity(model_dir)
    for name, p in sorted((paths or {}).items()):
        if p is not None:
            out[name] = folder_identity(p)
    out["sha256"] = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in out.items()}).encode()).hexdigest()
    return out


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Atomic ``np.savez``: temporary name in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Atomic ``Path.write_text``: temporary name in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomic, sorted, indented JSON (numpy values, paths and dataclasses through :func:`json_default`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(x: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values, paths and dataclasses (reports, run files)."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def normalise_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, numpy values as Python ones, sorted keys)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


def check_or_write_identity(path: Path, identity: dict[str, Any], what: str) -> None:
    """Writes ``identity`` to ``path``, or checks that an existing one (a resumed run) is the same."""
    identity = normalise_json(identity)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise ValueError(
                f"{path}: this {what} folder was started with different settings (fields {diff}); "
                f"resume with the same settings or use another folder"
            )
        return
    if process_index() == 0:
        write_json(path, identity)


def process_index() -> int:
    """This JAX process's index (0 on one host)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """The number of JAX processes (hosts)."""
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Waits until every host reaches the barrier ``name`` (nothing on one host)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class ShardProgress:
    """Progress lines of a step done in shards: ``progress(shard, images)`` after each finished shard, with the
    rate and the time left for this host's remaining shards."""

    def __init__(self, what: str, total_shards: int, todo: int, enabled: bool):
        self.what, self.total, self.todo, self.enabled = what, total_shards, todo, enabled
        self.done, self.images, self.t0 = 0, 0, time.perf_counter()

    def __call__(self, shard: int, n: int) -> None:
        self.done += 1
        self.images += n
        if not self.enabled:
            return
        dt = time.perf_counter() - self.t0
        rate = self.images / max(dt, 1e-9)
        eta = (self.todo - self.done) * dt / self.done
        print(
            f"[evaluate] {self.what}: shard {shard + 1}/{self.total} done ({self.done}/{self.todo} of this host's "
            f"remaining) {self.images} images {rate:.2f} img/s, ETA {eta:.0f}s",
            flush=True,
        )


def _pad_batch(rows: np.ndarray, size: int) -> np.ndarray:
    if len(rows) == size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)], axis=0)


def batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
    """Applies ``fn`` to fixed-size batches of ``x`` (the last one padded; one compilation)."""
    out = []
    for s in range(0, len(x), size):
        chunk = x[s : s + size]
        out.append(np.asarray(fn(_pad_batch(chunk, size)))[: len(chunk)])
    return np.concatenate(out, axis=0)


def local_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of this host's device count."""
    import jax

    n = jax.local_device_count()
    return -(-batch_size // n) * n
