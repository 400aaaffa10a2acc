"""Serialized StableHLO (``jax.export``): a network's forward as a portable compiled-program artifact.

``model.stablehlo`` is ``jax.export.Exported.serialize()`` of ``fn(variables, *inputs)`` with a symbolic batch;
``weights.safetensors`` holds the variables with '/'-joined keys. A consumer needs JAX and safetensors, not this
package's model code (README, "Export")::

    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    outputs = exported.call(variables, *inputs)  # variables: the nested dict rebuilt from the safetensors keys

This is also how a whole sampler is shipped (:mod:`unclip_jax.pipeline.export`): the artifact is whatever jitted
function it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

ARTIFACT = "model.stablehlo"
WEIGHTS = "weights.safetensors"


def flat_variables(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{"params/proj_in/kernel": array}``."""
    out: dict[str, np.ndarray] = {}
    for k, v in variables.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_variables(v, key + "/"))
        else:
            out[key] = np.asarray(jax.device_get(v))
    return out


def nested_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_variables`."""
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return tree


def write(
    fn: Callable[..., Any], variables: Mapping[str, Any], inputs: Sequence[jax.ShapeDtypeStruct], folder: Path
) -> dict[str, Any]:
    """Exports ``fn(variables, *inputs)`` (inputs abstract, symbolic batch allowed) into ``folder``."""
    from safetensors.numpy import save_file

    flat = flat_variables(variables)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), nested_variables(flat))
    exported = jax.export.export(jax.jit(fn))(abstract, *inputs)
    (folder / ARTIFACT).write_bytes(exported.serialize())
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(folder / WEIGHTS))
    return {"platforms": list(exported.platforms), "calling_convention_version": exported.calling_convention_version}


def load(folder: Path) -> Callable[..., tuple[Any, ...]]:
    """``run(*inputs) -> outputs`` of an export folder, from the artifact and the weights alone."""
    from safetensors.numpy import load_file

    exported = jax.export.deserialize(bytearray((folder / ARTIFACT).read_bytes()))
    (expected, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    # safetensors stores a 0-d array as [1]: give every leaf the shape the program was exported with.
    variables = jax.tree.map(
        lambda aval, a: np.reshape(a, aval.shape), expected, nested_variables(load_file(str(folder / WEIGHTS)))
    )

    def run(*inputs: Any) -> tuple[Any, ...]:
        out = exported.call(variables, *inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run
