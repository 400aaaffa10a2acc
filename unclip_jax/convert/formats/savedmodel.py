"""TensorFlow SavedModel: a network's forward as a ``serving_default`` signature with a polymorphic batch.

``jax.experimental.jax2tf`` embeds the network's StableHLO (native serialization) in a ``tf.function`` whose
weights are ``tf.Variable`` s of the module, so TF Serving / ``tf.saved_model.load`` run it with named inputs
and outputs and any batch size. TensorFlow is imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.convert.formats.signatures import BATCH, TensorSpec

SIGNATURE = "serving_default"
FOLDER = "saved_model"


def write(
    fn: Callable[..., Any],
    variables: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    folder: Path,
) -> dict[str, Any]:
    """Saves ``fn(variables, *inputs)`` under ``folder/saved_model`` with the signature :data:`SIGNATURE`."""
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(fn, polymorphic_shapes=[None, *[f"({BATCH}, ...)" for _ in inputs]])
    module = tf.Module()
    module.variables_ = tf.nest.map_structure(
        lambda a: tf.Variable(np.asarray(jax.device_get(a)), trainable=False), dict(variables)
    )
    specs = [tf.TensorSpec([None, *s.shape[1:]], tf.as_dtype(s.dtype), name=s.name) for s in inputs]

    @tf.function(autograph=False, input_signature=specs)
    def serve(*xs):
        out = converted(module.variables_, *xs)
        return {spec.name: y for spec, y in zip(outputs, out, strict=True)}

    module.serve = serve
    tf.saved_model.save(module, str(folder / FOLDER), signatures={SIGNATURE: serve})
    return {"signature": SIGNATURE, "tensorflow_version": tf.__version__}


def load(folder: Path, input_names: Sequence[str], output_names: Sequence[str]) -> Callable[..., tuple[Any, ...]]:
    """``run(*inputs) -> outputs`` through ``tf.saved_model.load`` and the serving signature."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder / FOLDER)).signatures[SIGNATURE]

    def run(*inputs: Any) -> tuple[Any, ...]:
        out = serve(**dict(zip(input_names, inputs, strict=True)))
        return tuple(out[name].numpy() for name in output_names)

    return run
