"""Orbax checkpointing of the train state together with the data iterator, and params-only export.

A checkpoint ``WORKDIR/checkpoints/<step>/`` holds two items:

- ``state``: the :class:`~unclip_jax.train.state.TrainState` (``ocp.args.StandardSave``;
  every process writes its own shards). Restoring passes the NEW run's abstract state
  (``jax.ShapeDtypeStruct`` with the new ``NamedSharding`` s) as the target, so a
  checkpoint written on one mesh / device count restores onto another.
- ``data``: each process's input-iterator state as ``process_<i>-of-<n>.json`` (same
  layout as grain's own Orbax handler), snapshotted when ``save`` is called so that an
  asynchronous save can never record a later position. A resumed run therefore sees
  exactly the batches it would have seen.

Saves are asynchronous (``config.checkpoint.async_save``), every ``config.checkpoint.every``
steps and at the end, keeping the last ``config.checkpoint.keep``. Orbax writes into a
temporary directory and renames it when complete, so a process killed mid-save leaves
the previous checkpoint as the latest one.

Integrity (the run must never continue from, or export, garbage): once a save is complete (Orbax's async write
finished and the step folder renamed into place), process 0 writes ``<step>/unclip.json`` with the SHA-256 and size
of every file of both items and the run's config. :meth:`Checkpointer.restore_newest_good` verifies those checksums
and that every restored float array is finite; a checkpoint that fails is reported in one line naming its step and
the first bad file, left where it is, and the next older one is tried (a later save of the same step moves the
damaged folder to ``checkpoints.damaged/`` rather than overwriting it). Checkpoints written before checksums were
recorded restore unverified (said in a log line).

Params-only export (:func:`export_params`) writes the EMA weights in the native format of
:mod:`unclip_jax.convert.native` (``config.json`` + ``params.safetensors``), which the
sampling pipeline and the weight bridge read without importing ``train``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from unclip_jax.convert import native

log = logging.getLogger("unclip_jax.train")

META_FILE = "unclip.json"  # <step>/unclip.json: checksums of the items' files + the run's config
ITEMS = ("state", "data")


class CheckpointError(ValueError):
    """No checkpoint of a work directory can be used (every one damaged, or none fits the config)."""


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON of an input iterator's state (grain ``DatasetIterator`` dict or loader bytes)."""

    def _file(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.state
        payload = {"bytes": state.decode()} if isinstance(state, bytes) else {"state": state}
        self._file(directory).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no input-iterator state for this process; the checkpoint was written by another "
                "number of processes (iterator positions cannot be re-split)"
            )
        try:
            payload = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return payload["bytes"].encode() if "bytes" in payload else payload["state"]

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _iter_state(data_iter: Any) -> Any:
    get = getattr(data_iter, "get_state", None)
    return None if get is None else get()


class Checkpointer:
    """The run's ``CheckpointManager`` (``WORKDIR/checkpoints``) with state + data items and checksums.

    Args:
      directory: checkpoint root.
      every: save interval in steps (``save`` with ``force`` ignores it).
      keep: checkpoints kept (oldest deleted first).
      async_save: write in a background thread (arrays are copied to host first).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every)),
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending: list[tuple[int, Mapping[str, Any] | None]] = []  # saved, checksums not yet written
        self._recorder: threading.Thread | None = None  # hashes completed checkpoints beside training

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any = None,
        *,
        force: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> bool:
        """Saves ``state`` (and the iterator position) at ``step``; returns whether a save started.

        ``config`` (the run's config as a dict) is recorded with the checksums once the save is complete.
        """
        self._finalize()
        if int(step) in self.all_steps():
            self._move_aside(int(step))
        items = {"state": ocp.args.StandardSave(state)}
        data_state = _iter_state(data_iter)
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        started = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if started and jax.process_index() == 0:
            self._pending.append((int(step), config))
        return started

    def poll(self) -> None:
        """Starts recording the checksums of saves that have completed (cheap; the loop calls it every step)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self._record()

    def _move_aside(self, step: int) -> None:
        """A damaged checkpoint the run fell back from, about to be written again: kept, never overwritten."""
        src = self.step_dir(step)
        dst = epath.Path(str(self.directory) + ".damaged") / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(os.fspath(src), os.fspath(dst))
            log.warning("checkpoint step %d: the damaged folder is kept as %s; saving step %d anew", step, dst, step)
        _sync("unclip_move_aside")
        self.manager.reload()

    def _finalize(self) -> None:
        """Waits for the async save and for the checksums of every completed checkpoint to be written."""
        self.manager.wait_until_finished()
        self._record()
        if self._recorder is not None:
            self._recorder.join()
            self._recorder = None

    def _record(self) -> None:
        """Process 0 hashes the completed checkpoints in a background thread (one at a time), writing each
        ``<step>/unclip.json`` atomically; the other processes write nothing (their files are in the same folder)."""
        if not self._pending:
            return
        if self._recorder is not None:
            self._recorder.join()
        pending, self._pending = self._pending, []
        self._recorder = threading.Thread(target=self._write_meta, args=(pending,), name="unclip-checksums")
        self._recorder.start()

    def _write_meta(self, pending: list[tuple[int, Mapping[str, Any] | None]]) -> None:
        for step, config in pending:
            folder = self.step_dir(step)
            try:
                files = checksums(folder)
                if not any(k.startswith("state/") for k in files):  # not (or no longer) a complete checkpoint
                    log.debug("checkpoint step %d: no state files to record", step)
                    continue
                meta = {"format": 1, "step": step, "files": files}
                if config is not None:
                    meta["config"] = json.loads(json.dumps(dict(config), default=str))
                tmp = folder / f".{META_FILE}.tmp"
                tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
                os.replace(os.fspath(tmp), os.fspath(folder / META_FILE))
            except OSError as e:  # rotated out (keep) while hashing
                log.debug("checkpoint step %d: no checksums recorded (%s)", step, e)

    def meta(self, step: int) -> dict[str, Any] | None:
        """``<step>/unclip.json`` (None for a checkpoint written before checksums were recorded).

        Raises:
          ValueError: the file exists but cannot be read (naming it).
        """
        path = self.step_dir(step) / META_FILE
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta.get("files"), dict):
                raise ValueError("no 'files' table")
            return meta
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from e

    def verify(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step``'s files (``None``: they match their checksums, or it has none).

        The answer names the first bad file: missing, a different size, or different content.
        """
        try:
            meta = self.meta(step)
        except ValueError as e:
            return str(e)
        if meta is None:
            return None
        folder = self.step_dir(step)
        for rel, (size, digest) in sorted(meta["files"].items()):
            path = folder / rel
            if not path.exists():
                return f"{path}: missing"
            got = path.stat().length
            if got != size:
                return f"{path}: {got} bytes, {size} when saved"
            if _sha256(path) != digest:
                return f"{path}: content differs from its checksum"
        return None

    def newest_verified_step(self) -> int | None:
        """The newest checkpoint whose files verify (checksums only; no restore)."""
        self._finalize()
        for step in reversed(self.all_steps()):
            if self.verify(step) is None:
                return step
        return None

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> tuple[int, Any]:
        """Restores onto ``abstract_state``'s shardings; sets ``data_iter``'s position when both have one.

        No verification (:meth:`restore_newest_good` verifies).

        Returns:
          (step, state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.step_dir(step) / "data").exists()
        if data_iter is not None and has_data:
            items["data"] = DataStateRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if "data" in items:
            data_iter.set_state(restored["data"])
        return step, restored["state"]

    def restore_newest_good(
        self, abstract_state: Any, data_iter: Any = None, steps: list[int] | None = None
    ) -> tuple[int, Any]:
        """Restores the newest checkpoint (of ``steps``, default all) that verifies and holds only finite arrays.

        Each one that fails is reported in one warning line (step, file, reason) and left in place. A checkpoint
        whose files verify but whose restore fails does not fit this run's state (a config change), which is an
        error, not a reason to fall back.

        Raises:
          CheckpointError: no checkpoint verifies (listing why each failed), or one does not fit the state.
        """
        steps = self.all_steps() if steps is None else sorted(steps)
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        problems = []
        for i, step in enumerate(reversed(steps)):
            problem = self.verify(step)
            has_sums = problem is None and self._has_meta(step)
            if problem is None:
                if not has_sums:
                    log.info(
                        "checkpoint step %d has no checksums (saved before they were recorded, or the run stopped "
                        "before recording them): restoring it unverified",
                        step,
                    )
                saved = _iter_state(data_iter)
                try:
                    _, state = self.restore(abstract_state, data_iter, step)
                    problem = non_finite(state, f"checkpoint step {step} ({self.step_dir(step)})")
                except Exception as e:  # noqa: BLE001 - Orbax / TensorStore / JSON errors of damaged files
                    if has_sums:
                        raise CheckpointError(
                            f"checkpoint step {step} ({self.step_dir(step)}): its files verify but do not restore "
                            f"onto this run's state: {_first_line(e)}. Did the model or optimizer config change? "
                            "Resume with the config it was saved with, or use a new --workdir"
                        ) from e
                    problem = f"{self.step_dir(step)}: does not restore ({_first_line(e)})"
                if problem is None:
                    return step, state
                if saved is not None:
                    data_iter.set_state(saved)
            older = steps[len(steps) - i - 2] if i + 1 < len(steps) else None
            then = f"falling back to step {older}" if older is not None else "no older checkpoint"
            log.warning("checkpoint step %d is damaged: %s; left in place, %s", step, problem, then)
            problems.append(f"step {step}: {problem}")
        raise CheckpointError(
            f"{self.directory}: no usable checkpoint ({'; '.join(problems)}). Move the damaged ones away to start "
            "from scratch, or use a new --workdir"
        )

    def _has_meta(self, step: int) -> bool:
        return (self.step_dir(step) / META_FILE).exists()

    def wait(self) -> None:
        self._finalize()

    def close(self) -> None:
        self._finalize()
        self.manager.close()


def checksums(folder: epath.Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file of the items (``state/``, ``data/``) of a step folder."""
    out = {}
    for item in ITEMS:
        root = folder / item
        if not root.exists():
            continue
        for dirpath, _, names in os.walk(os.fspath(root)):
            for name in names:
                path = epath.Path(dirpath) / name
                out[os.path.relpath(os.fspath(path), os.fspath(folder))] = [path.stat().length, _sha256(path)]
    return out


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def non_finite(tree: Any, where: str) -> str | None:
    """Names the first float array of ``tree`` holding NaN/inf (``None`` when all are finite)."""
    import jax.numpy as jnp

    leaves = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)
    ]
    if not leaves:
        return None
    flags = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves])
    for (name, _), ok in zip(leaves, flags, strict=True):
        if not bool(np.asarray(ok.addressable_data(0) if hasattr(ok, "addressable_data") else ok)):
            return f"{where}: array {name} holds non-finite values"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line[:300] + (" ..." if len(line) > 300 else "")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying the target shardings (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded, multi-process) arrays, gathered on every process."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def export_params(
    module: Any,
    variables: dict[str, Any],
    folder: str | os.PathLike,
    variant: str | None = None,
    diffusion: Mapping[str, Any] | None = None,
) -> str:
    """Writes ``variables`` (e.g. ``{'params': ema_params, 'stats': ...}``) as a native params-only folder.

    ``diffusion`` (the experiment's ``config.diffusion``) is written beside the weights as ``diffusion.json``,
    which is where :mod:`unclip_jax.pipeline.loading` finds the training schedule of a native component.
    Every process must call it (the gather is collective); only process 0 writes.
    """
    host = to_host(variables)
    extra = None
    if diffusion is not None:
        extra = {"diffusion.json": json.dumps(dict(diffusion), indent=2, sort_keys=True) + "\n"}
    if jax.process_index() == 0:
        native.save_native(module, host, folder, variant=variant, extra_files=extra)
    return str(folder)


def clean_stale_staging(folder: str | os.PathLike) -> list[str]:
    """Removes what an interrupted write of ``folder`` left beside it: ``.<name>.tmp-*`` (a partial export) and
    ``.<name>.old-*`` (a replaced one), the names of :func:`unclip_jax.convert.io.staged_folder`. Called by the
    writer of ``folder`` (which holds the work directory's lock), one warning line per folder removed."""
    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    removed = []
    if jax.process_index() != 0 or not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            path = os.path.join(parent, entry)
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s (left by an interrupted export of %s)", path, name)
            removed.append(path)
    return removed


def init_from_native(state: Any, shardings: Any, folder: str | os.PathLike) -> Any:
    """``state`` with its params, EMA params and extra collections replaced by a native folder's variables.

    The folder (``unclip convert import`` of Karlo weights, or a training ``export/ema``) must hold exactly the
    tree of the task's model: every key and shape is checked, and the values are cast to the state's dtypes and
    placed into the state's shardings (every process reads the folder; each keeps its own shards).

    Raises:
      ValueError: naming ``config.init_from``, the folder and the first missing/unexpected key or shape mismatch.
    """
    import flax.linen as nn

    _, variables = native.load_native(folder)
    variables = nn.unbox(dict(variables))
    where = f"config.init_from={str(folder)!r}"
    params = _checked_like(variables.get("params"), state.params, f"{where}: params")
    extra = dict(state.extra)
    for name, current in state.extra.items():
        if name in variables:
            extra[name] = _checked_like(variables[name], current, f"{where}: {name}")
    params = _place(params, shardings.params)
    return state.replace(
        params=params,
        ema_params=_place(jax.tree.map(np.asarray, params), shardings.ema_params),
        extra=_place(extra, shardings.extra),
    )


def _checked_like(tree: Any, like: Any, where: str) -> Any:
    from unclip_jax.convert.mapping import flatten, unflatten

    if tree is None:
        raise ValueError(f"{where}: missing")
    got, want = flatten(tree), flatten(like)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{where}: keys differ from the model's: missing {['/'.join(k) for k in missing[:5]]}, "
            f"unexpected {['/'.join(k) for k in unexpected[:5]]} (is it the same variant?)"
        )
    out = {}
    for k, ref in want.items():
        if tuple(got[k].shape) != tuple(ref.shape):
            raise ValueError(f"{where}: {'/'.join(k)} has shape {tuple(got[k].shape)}, the model {tuple(ref.shape)}")
        out[k] = np.asarray(jax.device_get(got[k])).astype(ref.dtype)
    return unflatten(out)


def _place(tree: Any, shardings: Any) -> Any:
    """Host arrays (identical on every process) -> global arrays with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]), tree, shardings)
