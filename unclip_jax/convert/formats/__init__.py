"""Exports of a network to other runtimes: ONNX, TensorFlow SavedModel and serialized StableHLO.

Each format writes one self-describing folder (:mod:`~unclip_jax.convert.formats.manifest`): the artifact, the
network's serving signature (:mod:`~unclip_jax.convert.formats.signatures`: named inputs with a symbolic batch,
named outputs) and the source config, written atomically. :func:`load_export` runs any of them back in its own
runtime (ONNX Runtime, TensorFlow, JAX alone) behind one call, which is how the tests compare every format with
the Flax forward. The diffusers/transformers layout stays the job of the per-component converters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from unclip_jax.convert.formats import manifest as manifest_lib
from unclip_jax.convert.formats.manifest import ExportError, read_manifest, write_export
from unclip_jax.convert.formats.signatures import Signature, TensorSpec, signature_of, symbolic_inputs

FORMATS = ("onnx", "savedmodel", "stablehlo")

__all__ = ["FORMATS", "ExportError", "Exported", "export_network", "load_export", "write_signature_export"]


def write_signature_export(
    signature: Signature,
    variables: Mapping[str, Any],
    folder: str | os.PathLike,
    fmt: str,
    describe: Mapping[str, Any],
) -> Path:
    """Writes ``signature`` (any pure ``fn(variables, *inputs)``, a network or a whole sampler) in format ``fmt``.

    Raises:
      ExportError: an unknown format, or a program the format cannot express (naming both).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {FORMATS}")
    variables = nn.unbox(dict(variables))
    names_in = [s.name for s in signature.inputs]
    names_out = [s.name for s in signature.outputs]
    what = describe.get("network", "program")

    def write_files(tmp: Path) -> None:
        try:
            if fmt == "stablehlo":
                from unclip_jax.convert.formats import stablehlo

                info = stablehlo.write(signature.fn, variables, symbolic_inputs(signature), tmp)
            elif fmt == "onnx":
                from unclip_jax.convert.formats import onnx

                info = onnx.write(signature.fn, variables, symbolic_inputs(signature), tmp, names_in, names_out)
            else:
                from unclip_jax.convert.formats import savedmodel

                info = savedmodel.write(signature.fn, variables, signature.inputs, signature.outputs, tmp)
        except ImportError:
            raise
        except Exception as e:  # a converter's own error types: say which program and format
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{what}: cannot be exported as {fmt} ({type(e).__name__}: {first})") from e
        (tmp / "format_info.txt").write_text("".join(f"{k}: {v}\n" for k, v in info.items()))

    desc = {
        **describe,
        "inputs": [s.describe() for s in signature.inputs],
        "outputs": [s.describe() for s in signature.outputs],
    }
    return write_export(folder, fmt, desc, write_files)


def export_network(
    module: nn.Module,
    variables: Mapping[str, Any],
    folder: str | os.PathLike,
    fmt: str,
    component: str | None = None,
    source_config: Mapping[str, Any] | None = None,
    diffusion: Mapping[str, Any] | None = None,
) -> Path:
    """Exports one network's forward (see :func:`~unclip_jax.convert.formats.signatures.signature_of`).

    Args:
      module, variables: the network (e.g. from :func:`unclip_jax.convert.native.load_native`).
      folder: destination, written atomically.
      fmt: one of :data:`FORMATS`.
      component: for a two-tower CLIP, ``text_encoder`` or ``image_encoder``.
      source_config: the native folder's ``config.json`` (recorded in the manifest).
      diffusion: the ``diffusion.json`` the network was trained with, if any (recorded).
    """
    signature = signature_of(module, variables, component)
    describe = {
        "network": type(module).__name__,
        "component": component,
        "source_config": dict(source_config or {}),
        "diffusion": dict(diffusion) if diffusion else None,
    }
    return write_signature_export(signature, variables, folder, fmt, describe)


@dataclasses.dataclass
class Exported:
    """An export folder loaded in its own runtime: ``exported(**inputs) -> {output name: array}``."""

    folder: Path
    manifest: dict[str, Any]
    run: Callable[..., tuple[Any, ...]]

    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["outputs"]]

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ExportError(f"{self.folder}: missing inputs {missing}; the export takes {self.input_names}")
        out = self.run(*[np.asarray(inputs[n]) for n in self.input_names])
        return {name: np.asarray(y) for name, y in zip(self.output_names, out, strict=True)}


def load_export(folder: str | os.PathLike, verify: bool = True) -> Exported:
    """Loads an export folder of any format, checking its manifest and checksums first."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify=verify)
    fmt = manifest.get("format")
    names_in = [s["name"] for s in manifest.get("inputs", [])]
    names_out = [s["name"] for s in manifest.get("outputs", [])]
    if fmt == "stablehlo":
        from unclip_jax.convert.formats import stablehlo

        run = stablehlo.load(folder)
    elif fmt == "onnx":
        from unclip_jax.convert.formats import onnx

        run = onnx.load(folder, names_in)
    elif fmt == "savedmodel":
        from unclip_jax.convert.formats import savedmodel

        run = savedmodel.load(folder, names_in, names_out)
    else:
        raise ExportError(f"{folder / manifest_lib.MANIFEST}: format {fmt!r} is not one of {FORMATS}")
    return Exported(folder, manifest, run)


def spec_of(name: str, shape: tuple[int | str, ...], dtype: str = "float32") -> TensorSpec:
    """A :class:`TensorSpec` (for callers that build a :class:`Signature` of their own, e.g. a sampler)."""
    return TensorSpec(name, shape, dtype)
