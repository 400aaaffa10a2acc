"""The export phase: the ``bench`` decoder (U-Net + text projection) written in every export format.

For each of :data:`unclip_jax.convert.formats.FORMATS`: the seconds to write the export (conversion and
serialisation), its size on disk, and the seconds to load it in its own runtime and run it once on a batch of 2
(ONNX Runtime, TensorFlow, JAX alone), with the largest difference to the Flax forward as a check.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def job_export(workdir: Path, repeats: int, variant: str = "bench") -> dict[str, Any]:
    """Exports a random decoder ``variant`` in every format; per format the timings and size."""
    import flax.linen as nn
    import jax
    import numpy as np

    from unclip_jax.convert import formats
    from unclip_jax.convert.formats.signatures import signature_of
    from unclip_jax.models import decoder

    module = decoder.build(variant)
    signature = signature_of(module, None)
    inputs = signature.example(2)
    variables = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), *inputs.values()))
    # Perturbed: the zero-initialised output convolution would make every format agree on zeros.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    variables = jax.tree.unflatten(
        treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )
    want = np.asarray(jax.jit(signature.fn)(variables, *inputs.values())[0])
    out: dict[str, Any] = {
        "network": f"decoder:{variant}",
        "params": int(sum(np.size(x) for x in jax.tree.leaves(variables))),
        "reference_max_abs": float(np.abs(want).max()),
    }
    for fmt in formats.FORMATS:
        t0 = time.perf_counter()
        folder = formats.export_network(module, variables, workdir / f"export_{fmt}", fmt)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = formats.load_export(folder)(**inputs)["model_output"]
        out[fmt] = {
            "export_s": export_s,
            "size_mb": folder_mb(folder),
            "load_run_s": time.perf_counter() - t0,
            "max_abs_diff": float(np.abs(got - want).max()),
        }
    return out
