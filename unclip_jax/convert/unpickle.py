"""A restricted reader of ``torch.save`` / ``torch.jit.save`` files: tensors only, no torch, no code from the file.

PyTorch checkpoints are pickles, and unpickling runs whatever globals the file names. :func:`read_torch_pickle`
resolves only the globals needed to rebuild tensors (``torch._utils._rebuild_tensor_v2``, ``_rebuild_parameter``,
typed storages, ``collections.OrderedDict``, TorchScript's ``build_intlist``) and TorchScript module classes
(``__torch__.*``, which become inert attribute bags, :class:`ScriptObject`); any other global is refused. It reads the
zip formats (``<root>/data.pkl`` + ``<root>/data/<key>``, also TorchScript archives) and the legacy (pre-1.6) stream
format. The weight bridge reads safetensors everywhere else; this reader exists for the FID Inception weights
(:mod:`unclip_jax.convert.inception`), which are published only as pickles.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.convert.io import ConversionError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        if dt == "bfloat16":
            import ml_dtypes

            dt = ml_dtypes.bfloat16
        self.dtype = np.dtype(dt)


class _StorageRef:
    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """A tensor whose storage bytes may not have been read yet (legacy format stores them after the pickle)."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def resolve(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        if self.storage.key not in storages:
            raise ConversionError(f"tensor storage {self.storage.key!r} is missing from the file")
        buf = storages[self.storage.key]
        n = int(np.prod(self.size)) if self.size else 1
        if n == 0:
            return np.zeros(self.size, buf.dtype)
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
        if last >= buf.size:
            raise ConversionError(f"tensor of shape {self.size} runs past its storage {self.storage.key!r}")
        view = np.lib.stride_tricks.as_strided(
            buf[self.offset :], shape=self.size, strides=[s * buf.itemsize for s in self.stride]
        )
        return np.array(view)


class ScriptObject:
    """A TorchScript module from ``data.pkl``: an attribute bag, never executed."""

    _qualname = "?"

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<TorchScript {self._qualname}>"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
    if qualname not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (ScriptObject,), {"_qualname": qualname})
    return _SCRIPT_CLASSES[qualname]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _Unpickler(pickle.Unpickler):
    """Allows only tensor rebuilding and TorchScript attribute bags (see module docstring)."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist"):
            return list
        if module.startswith("__torch__"):
            return _script_class(f"{module}.{name}")
        raise ConversionError(
            f"{self.where}: refusing to load global {module}.{name} (only torch tensors and TorchScript "
            "module attributes are read from weight pickles)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ConversionError(f"{self.where}: unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ConversionError(f"{self.where}: storage {key!r} has unsupported type {storage_type!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise ConversionError(f"{self.where}: storage views (legacy view_metadata) are not supported")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.resolve(storages)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve(obj[k], storages)
        return obj
    if isinstance(obj, ScriptObject):
        for k in list(obj.__dict__):
            obj.__dict__[k] = _resolve(obj.__dict__[k], storages)
        return obj
    if isinstance(obj, list):
        return [_resolve(v, storages) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, storages) for v in obj)
    return obj


def _refs(obj: Any, out: dict[str, _StorageRef]) -> dict[str, _StorageRef]:
    if isinstance(obj, _TensorRef):
        out[obj.storage.key] = obj.storage
    elif isinstance(obj, dict):
        for v in obj.values():
            _refs(v, out)
    elif isinstance(obj, ScriptObject):
        for v in obj.__dict__.values():
            _refs(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _refs(v, out)
    return out


def read_torch_pickle(path: str | os.PathLike) -> Any:
    """Reads a ``torch.save`` / ``torch.jit.save`` file without torch and without running its code.

    Supports the zip formats (``<root>/data.pkl`` + ``<root>/data/<key>``, also TorchScript
    archives) and the legacy (pre-1.6) stream format. Tensors become numpy arrays;
    TorchScript modules become :class:`ScriptObject` attribute bags.

    Raises:
      ConversionError: unreadable file, or a pickle that references anything but tensors.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConversionError(f"{where}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkls) != 1:
                raise ConversionError(f"{where}: zip without exactly one data.pkl (found {pkls})")
            root = pkls[0][: -len("data.pkl")]
            obj = _Unpickler(io.BytesIO(zf.read(pkls[0])), where).load()
            storages = {}
            for key, ref in _refs(obj, {}).items():
                entry = f"{root}data/{key}"
                if entry not in names:
                    raise ConversionError(f"{where}: storage {entry} is missing from the archive")
                raw = zf.read(entry)
                need = ref.numel * ref.dtype.itemsize
                if len(raw) < need:
                    raise ConversionError(f"{where}: storage {entry} has {len(raw)} bytes, expected {need}")
                storages[key] = np.frombuffer(raw[:need], dtype=ref.dtype)
        return _resolve(obj, storages)
    with open(path, "rb") as f:
        try:
            magic = _Unpickler(f, where).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ConversionError(f"{where}: neither a zip archive nor a torch.save pickle ({e})") from e
        if magic != LEGACY_MAGIC:
            raise ConversionError(f"{where}: not a torch.save file (bad magic number)")
        _Unpickler(f, where).load()  # protocol version
        _Unpickler(f, where).load()  # sys info
        obj = _Unpickler(f, where).load()
        keys = _Unpickler(f, where).load()
        refs = _refs(obj, {})
        storages = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            ref = refs.get(str(key))
            if ref is None:
                raise ConversionError(f"{where}: storage {key!r} is not referenced by any tensor")
            raw = f.read(numel * ref.dtype.itemsize)
            if len(raw) != numel * ref.dtype.itemsize:
                raise ConversionError(f"{where}: truncated storage {key!r}")
            storages[str(key)] = np.frombuffer(raw, dtype=ref.dtype)
    return _resolve(obj, storages)


def script_state(obj: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Flattens a TorchScript object tree into ``({dotted key: tensor}, {module path: non-tensor attributes})``."""
    tensors: dict[str, np.ndarray] = {}
    attrs: dict[str, dict[str, Any]] = {}
    items = obj.__dict__.items() if isinstance(obj, ScriptObject) else obj.items()
    mine = {}
    for k, v in items:
        if k.startswith("_"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, np.ndarray):
            tensors[key] = v
        elif isinstance(v, ScriptObject | dict):
            t, a = script_state(v, key + ".")
            tensors.update(t)
            attrs.update(a)
        else:
            mine[k] = v
    attrs[prefix.rstrip(".")] = mine
    return tensors, attrs
