"""Declarative, invertible maps between PyTorch state dicts and Flax parameter trees.

A converter for one architecture is a list of :class:`Rule` s, each pairing one Flax
parameter path with one PyTorch key and a layout transform. Import and export are both
derived from the same list, so ``import(export(params)) == params`` bit for bit, and
every mismatch (missing, unexpected or mis-shaped key) is reported with all the keys
involved, not just the first.

Layout transforms (PyTorch -> Flax):
- ``identity``: same array.
- ``linear``: ``nn.Linear.weight [out, in]`` -> ``Dense.kernel [in, out]``.
- ``conv``: ``nn.Conv2d.weight [out, in, kh, kw]`` -> ``Conv.kernel [kh, kw, in, out]``.
- ``conv1x1_linear``: ``nn.Conv2d`` 1x1 ``[out, in, 1, 1]`` -> ``Dense.kernel [in, out]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from unclip_jax.convert.io import ConversionError

Path = tuple[str, ...]

_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "conv1x1_linear": lambda a: a[:, :, 0, 0].T,
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "conv1x1_linear": lambda a: a.T[:, :, None, None],
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: Flax path <-> PyTorch key, with the layout transform between them."""

    flax: Path
    torch: str
    kind: str = "identity"

    def __post_init__(self):
        if self.kind not in _TO_FLAX:
            raise ValueError(f"Rule {self.torch}: unknown kind {self.kind!r}")


def linear(flax_prefix: Path, torch_prefix: str, bias: bool = True) -> list[Rule]:
    """Rules for a Dense layer (kernel [+ bias]) <-> nn.Linear (weight [+ bias])."""
    rules = [Rule((*flax_prefix, "kernel"), f"{torch_prefix}.weight", "linear")]
    if bias:
        rules.append(Rule((*flax_prefix, "bias"), f"{torch_prefix}.bias"))
    return rules


def conv(flax_prefix: Path, torch_prefix: str, bias: bool = True) -> list[Rule]:
    """Rules for a Conv layer <-> nn.Conv2d."""
    rules = [Rule((*flax_prefix, "kernel"), f"{torch_prefix}.weight", "conv")]
    if bias:
        rules.append(Rule((*flax_prefix, "bias"), f"{torch_prefix}.bias"))
    return rules


def norm(flax_prefix: Path, torch_prefix: str) -> list[Rule]:
    """Rules for a LayerNorm/GroupNorm (scale, bias) <-> (weight, bias)."""
    return [
        Rule((*flax_prefix, "scale"), f"{torch_prefix}.weight"),
        Rule((*flax_prefix, "bias"), f"{torch_prefix}.bias"),
    ]


# Flax submodules of a pre-norm transformer block (``unclip_jax.layers.transformer``), in the order of
# :func:`transformer_block`'s ``torch_names``.
TRANSFORMER_BLOCK: tuple[Path, ...] = (
    ("norm1",),
    ("attn", "query"),
    ("attn", "key"),
    ("attn", "value"),
    ("attn", "out"),
    ("norm2",),
    ("mlp", "fc1"),
    ("mlp", "fc2"),
)


def transformer_block(flax_prefix: Path, torch_prefix: str, torch_names: tuple[str, ...]) -> list[Rule]:
    """Rules for one transformer block: the :data:`TRANSFORMER_BLOCK` submodules <-> ``torch_names`` (same order;
    ``norm*`` are LayerNorms, the rest Linears)."""
    if len(torch_names) != len(TRANSFORMER_BLOCK):
        raise ValueError(f"transformer_block: {len(torch_names)} torch names for {len(TRANSFORMER_BLOCK)} submodules")
    rules: list[Rule] = []
    for sub, name in zip(TRANSFORMER_BLOCK, torch_names):
        make = norm if sub[0].startswith("norm") else linear
        rules += make((*flax_prefix, *sub), f"{torch_prefix}.{name}")
    return rules


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Flattens a nested dict of arrays into {path tuple: array}."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _check_unique(rules: list[Rule]) -> None:
    for attr in ("flax", "torch"):
        seen: set = set()
        dups = [getattr(r, attr) for r in rules if getattr(r, attr) in seen or seen.add(getattr(r, attr))]
        if dups:
            raise ValueError(f"converter has duplicate {attr} entries: {dups[:10]}")


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[str, Any] | None = None,
    where: str = "weights",
) -> dict[str, Any]:
    """Builds a Flax params tree from a PyTorch state dict.

    Args:
      state: {torch key: array}.
      rules: the architecture's rules; every rule must find its key and every key must
        be claimed by a rule.
      expected: optional Flax params (or ``jax.eval_shape`` output) of the architecture;
        when given, every produced array must have the expected shape, and every
        expected parameter must be produced.
      where: the file or folder name used in error messages.

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    rules = list(rules)
    _check_unique(rules)
    claimed = {r.torch for r in rules}
    missing = sorted(r.torch for r in rules if r.torch not in state)
    unexpected = sorted(k for k in state if k not in claimed)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    flat: dict[Path, np.ndarray] = {}
    for r in rules:
        if r.torch in state:
            flat[r.flax] = _TO_FLAX[r.kind](np.asarray(state[r.torch]))
    if expected is not None:
        exp = {p: tuple(v.shape) for p, v in flatten(expected).items()}
        bad = []
        for r in rules:
            if r.flax in flat and r.flax in exp and tuple(flat[r.flax].shape) != exp[r.flax]:
                torch_shape = tuple(np.asarray(state[r.torch]).shape)
                want = _torch_shape(exp[r.flax], r.kind)
                bad.append(f"{r.torch}: shape {torch_shape}, expected {want}")
        if bad:
            problems.append(f"mis-shaped keys ({len(bad)}): {bad}")
        unmapped = sorted("/".join(p) for p in exp if p not in {r.flax for r in rules})
        if unmapped:
            problems.append(f"parameters with no source key ({len(unmapped)}): {unmapped}")
    if problems:
        raise ConversionError(f"{where}: " + "; ".join(problems))
    return unflatten(flat)


def _torch_shape(flax_shape: tuple, kind: str) -> tuple:
    dummy = np.empty(flax_shape, dtype=np.uint8)
    return tuple(_TO_TORCH[kind](dummy).shape)


def flax_to_torch(params: Mapping[str, Any], rules: Iterable[Rule], where: str = "params") -> dict[str, np.ndarray]:
    """Builds a PyTorch state dict (numpy arrays, contiguous) from Flax params.

    Raises:
      ConversionError: if a rule's parameter is absent or a parameter has no rule.
    """
    rules = list(rules)
    _check_unique(rules)
    flat = flatten(params)
    missing = sorted("/".join(r.flax) for r in rules if r.flax not in flat)
    ruled = {r.flax for r in rules}
    unclaimed = sorted("/".join(p) for p in flat if p not in ruled)
    if missing or unclaimed:
        raise ConversionError(f"{where}: parameters missing {missing}; parameters with no rule {unclaimed}")
    return {r.torch: np.asarray(_TO_TORCH[r.kind](np.asarray(flat[r.flax])), order="C") for r in rules}
