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

Params-only export (:func:`export_params`) writes the EMA weights in the native format of
:mod:`unclip_jax.convert.native` (``config.json`` + ``params.safetensors``), which the
sampling pipeline and the weight bridge read without importing ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from unclip_jax.convert import native


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
        payload = json.loads(path.read_text())
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
    """The run's ``CheckpointManager`` (``WORKDIR/checkpoints``) with state + data items.

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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
        """Saves ``state`` (and the iterator position) at ``step``; returns whether a save started."""
        items = {"state": ocp.args.StandardSave(state)}
        data_state = _iter_state(data_iter)
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> tuple[int, Any]:
        """Restores onto ``abstract_state``'s shardings; sets ``data_iter``'s position when both have one.

        Returns:
          (step, state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / "data").exists()
        if data_iter is not None and has_data:
            items["data"] = DataStateRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if "data" in items:
            data_iter.set_state(restored["data"])
        return step, restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
