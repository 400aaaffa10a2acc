"""ONNX: a network's forward with a dynamic batch and its weights as initializers, run by ONNX Runtime.

The graph is converted from the network's jaxpr by ``jax2onnx`` (exact primitives, no TensorFlow round trip);
the batch is the symbolic input dimension ``batch``. ``jax2onnx``, ``onnx`` and ``onnxruntime`` are imported only
when an ONNX export is written or run (the ``export`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

ARTIFACT = "model.onnx"
OPSET = 23


def write(
    fn: Callable[..., Any],
    variables: Mapping[str, Any],
    inputs: Sequence[jax.ShapeDtypeStruct],
    folder: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> dict[str, Any]:
    """Converts ``fn(variables, *inputs)`` with the variables folded in as initializers."""
    try:
        import jax2onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the export extra: pip install -e '.[export]'") from e
    proto = jax2onnx.to_onnx(
        lambda *xs: fn(variables, *xs),
        list(inputs),
        opset=OPSET,
        input_names=list(input_names),
        output_names=list(output_names),
        model_name="unclip_jax",
    )
    (folder / ARTIFACT).write_bytes(proto.SerializeToString())
    return {"opset": OPSET}


def load(folder: Path, input_names: Sequence[str]) -> Callable[..., tuple[Any, ...]]:
    """``run(*inputs) -> outputs`` through an ONNX Runtime CPU session."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / ARTIFACT), providers=["CPUExecutionProvider"])

    def run(*inputs: Any) -> tuple[Any, ...]:
        return tuple(session.run(None, dict(zip(input_names, inputs, strict=True))))

    return run
