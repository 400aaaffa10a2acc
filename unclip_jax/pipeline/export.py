"""A whole sampler as one serialized StableHLO program: the decoder's guided loop from noise to image.

The cascade is one compiled program (:mod:`unclip_jax.pipeline.program`); exporting its ``decode`` plan with
``jax.export`` ships the entire sampling loop — CLIP text tower, the decoder's classifier-free-guided DDPM/DDIM
steps and, if asked, the upsamplers — as an artifact that runs with JAX alone (README, "Export"): no model code,
no Python loop, any batch size. The settings that shape the program (steps, sampler, guidance scale) are fixed at
export and recorded in the manifest; the captions, the CLIP image embeddings, the starting noise x_T and the PRNG
key of the per-step noise are inputs, so the artifact draws exactly the samples of the in-process pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unclip_jax.convert.formats import spec_of, write_signature_export
from unclip_jax.convert.formats.signatures import BATCH, Signature
from unclip_jax.pipeline.cascade import UnclipPipeline
from unclip_jax.pipeline.program import run_cascade
from unclip_jax.pipeline.settings import STAGES, StageSettings, resolve_settings


def sampler_signature(
    pipe: UnclipPipeline,
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str = "decoder",
) -> tuple[Signature, dict[str, Any], dict[str, Any]]:
    """(signature, weights, description) of the ``decode`` program of ``pipe``.

    The signature's ``fn(weights, input_ids, text_mask, image_embeds, x_T, key) -> (images,)`` runs the cascade
    from given CLIP image embeddings; ``key`` is the raw ``uint32[2]`` PRNG key of the per-step noise
    (``jax.random.PRNGKey(seed)``). ``weights`` holds every network's variables, the traced settings and the empty
    caption's tokens.
    """
    program = pipe.program("decode", settings, stop_after=stop_after)
    plan = program.plan
    null = pipe.text_inputs([""])
    weights = {
        "variables": dict(program.variables),
        "scales": dict(program.scales),
        "null_ids": np.asarray(null["null_ids"]),
        "null_mask": np.asarray(null["null_mask"]),
    }

    def fn(w, input_ids, text_mask, image_embeds, x_T, key):
        inputs = dict(
            input_ids=input_ids,
            mask=text_mask,
            null_ids=w["null_ids"],
            null_mask=w["null_mask"],
            image_embeds=image_embeds,
            x_T=x_T,
        )
        return (run_cascade(plan, w["variables"], inputs, w["scales"], key)["images"],)

    decoder = plan.decoder
    length = null["null_ids"].shape[1]
    size, channels = decoder.size, decoder.module.in_channels
    out_size = getattr(plan, stop_after).size if stop_after != "decoder" else size
    signature = Signature(
        inputs=(
            spec_of("input_ids", (BATCH, length), "int32"),
            spec_of("text_mask", (BATCH, length), "bool"),
            spec_of("image_embeds", (BATCH, decoder.module.clip_embeddings_dim)),
            spec_of("x_T", (BATCH, size, size, channels)),
            spec_of("key", (2,), "uint32"),
        ),
        outputs=(spec_of("images", (BATCH, out_size, out_size, channels)),),
        fn=fn,
    )
    runs = [name for name in STAGES if name != "prior" and plan.runs(name)]
    full = resolve_settings(settings)
    describe = {
        "network": "unclip decode sampler",
        "stop_after": stop_after,
        "settings": {name: full[name].describe() for name in runs},
    }
    return signature, weights, describe


def export_sampler(
    pipe: UnclipPipeline,
    folder: str | os.PathLike,
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str = "decoder",
) -> Path:
    """Writes the ``decode`` sampler of ``pipe`` as serialized StableHLO plus weights (atomically, with a manifest).

    Load it with :func:`unclip_jax.convert.formats.load_export` or, without this package, with
    ``jax.export.deserialize`` (README, "Export").
    """
    signature, weights, describe = sampler_signature(pipe, settings, stop_after)
    return write_signature_export(signature, weights, folder, "stablehlo", describe)


def prng_key_data(seed: int) -> np.ndarray:
    """The ``key`` input of an exported sampler for an int seed (the pipeline's ``PRNGKey(seed)``)."""
    return np.asarray(jax.random.PRNGKey(seed))
