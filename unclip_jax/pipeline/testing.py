"""Small random cascades for tests, demos and benchmarks (built from the models' variant tables).

``random_pipeline("test")`` builds every component of a variant with random weights drawn with numpy from the
abstract shapes (``jax.eval_shape`` of init: no init compilation, which takes tens of seconds for a U-Net on a busy
CPU); nothing is zero, unlike a fresh init whose output convolutions and learned CFG embedding are zeros (a fresh
U-Net predicts eps = 0). ``save_native_pipeline`` writes it as a folder of native
components (what ``unclip convert import`` / training exports produce) and ``save_diffusers_pipeline`` in diffusers'
Karlo layout (``UnCLIPPipeline`` folder: components, tokenizer, schedulers, ``model_index.json``).
``random_ar_prior`` builds an autoregressive prior (`unclip_jax.models.ar_prior.ARPrior`) with random weights and a
PCA codec fitted on random embeddings, to stand in for the diffusion prior (``pipe.components["prior"]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import stages
from unclip_jax.diffusion import GaussianDiffusion, get_named_beta_schedule
from unclip_jax.input.tokenizer import ClipTokenizer
from unclip_jax.models import ar_prior as ar_prior_lib
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import decoder as decoder_lib
from unclip_jax.models import pca_codec
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import upsampler as upsampler_lib
from unclip_jax.pipeline.cascade import Component, UnclipPipeline
from unclip_jax.pipeline.priors import prior_kind

# variant of each model per cascade size ("test": 16x16 decoder -> 32x32 super-res; "bench": 64 -> 256).
CASCADES = {
    "test": dict(clip="test", prior="test", decoder="test", upsampler="test"),
    "bench": dict(clip="tiny", prior="bench", decoder="bench", upsampler="bench"),
}


def _random_like(path: tuple, leaf: Any, rng: np.random.Generator) -> np.ndarray:
    """A random value for one parameter, by its name (fan-in scaled kernels, near-1 norm scales)."""
    name = str(getattr(path[-1], "key", path[-1]))
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if name == "kernel":
        fan_in = int(np.prod(shape[:-1])) or 1
        x = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif name == "scale":
        x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == "bias":
        x = 0.05 * rng.standard_normal(shape)
    else:  # embeddings, positional tables, learned tokens and the learned CFG embedding
        x = 0.1 * rng.standard_normal(shape)
    return np.asarray(x, dtype=dtype)


def random_variables(module: Any, rng: np.random.Generator, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Random ``{'params': ...}`` for ``module`` without compiling its init (shapes from ``jax.eval_shape``)."""
    import flax.linen as nn

    abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs)))
    return {"params": jax.tree_util.tree_map_with_path(lambda p, x: _random_like(p, x, rng), abstract["params"])}


def random_components(cascade: str = "test", seed: int = 0, super_res_last: bool = True) -> dict[str, Component]:
    """Random-weight components of a cascade size (see :data:`CASCADES`).

    Returns:
        dict with text_encoder, image_encoder, prior, decoder, super_res_first (and super_res_last).
    """
    v = CASCADES[cascade]
    rng = np.random.default_rng(seed)
    text = clip_lib.build_text(v["clip"])
    vision = clip_lib.build_vision(v["clip"])
    prior = prior_lib.build(v["prior"])
    dec = decoder_lib.build(v["decoder"])
    up = upsampler_lib.build(v["upsampler"])
    out: dict[str, Component] = {}

    def add(name, module, *args, **kwargs):
        out[name] = Component(module, random_variables(module, rng, *args, **kwargs))

    add("text_encoder", text, jnp.zeros((1, text.context_length), jnp.int32))
    add("image_encoder", vision, jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32))
    add("prior", prior, **prior_lib.example_inputs(prior))
    d = dec.clip_embeddings_dim
    s = dec.sample_size
    add(
        "decoder",
        dec,
        jnp.zeros((1, s, s, 3)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, d)),
        jnp.zeros((1, d)),
        jnp.zeros((1, text.context_length, text.width)),
    )
    # Non-trivial normalisation statistics for the prior (diffusers' clip_mean / clip_std).
    dim = prior.out_dim
    out["prior"].variables["stats"] = {
        "clip_mean": (0.1 * rng.standard_normal((1, dim))).astype(np.float32),
        "clip_std": (1.0 + 0.2 * rng.uniform(size=(1, dim))).astype(np.float32),
    }
    u = up.sample_size
    for name in ("super_res_first", "super_res_last") if super_res_last else ("super_res_first",):
        add(name, up, jnp.zeros((1, u, u, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, u, u, 3)))
    return out


def random_ar_prior(variant: str = "test", seed: int = 0, num_fit: int = 256, **overrides: Any) -> Component:
    """A random-weight `ARPrior` of ``variant`` with a PCA codec fitted on ``num_fit`` random embeddings.

    The embeddings have a decaying spectrum (so the PCA order is meaningful) and text embeddings correlated with them
    (so the dot-product buckets span a range of cosines); the codec goes into ``variables['stats']``.
    """
    module = ar_prior_lib.build(variant, **overrides)
    rng = np.random.default_rng(seed)
    variables = random_variables(module, rng, **ar_prior_lib.example_inputs(module))
    d = module.embedding_dim
    image = rng.standard_normal((num_fit, d)) * np.geomspace(1.0, 0.05, d) + 0.1 * rng.standard_normal(d)
    text = 0.5 * image + 0.5 * rng.standard_normal((num_fit, d)) * image.std(0)
    codec = pca_codec.fit(
        image, module.num_components, module.num_buckets, text_embeds=text, num_dot_buckets=module.num_dot_buckets
    )
    variables["stats"] = {k: np.asarray(v) for k, v in ar_prior_lib.codec_variables(codec).items()}
    return Component(module, variables)


def random_pipeline(cascade: str = "test", seed: int = 0, super_res_last: bool = True) -> UnclipPipeline:
    """An :class:`UnclipPipeline` of random components with the Karlo-default diffusions."""
    return UnclipPipeline(ClipTokenizer(pad_token="!"), **random_components(cascade, seed, super_res_last))


def diffusion_fields(d: GaussianDiffusion) -> dict[str, Any]:
    """The ``config.diffusion`` fields (`unclip_jax.diffusion.diffusion_from_config`) that rebuild ``d``; its beta
    schedule is recognised from its betas."""
    names = ("cosine", "linear")
    schedule = next((n for n in names if np.allclose(get_named_beta_schedule(n, d.num_timesteps), d.betas)), None)
    if schedule is None:
        raise ValueError(f"the diffusion's betas are none of the named schedules {names}")
    return dict(
        steps=d.num_timesteps,
        schedule=schedule,
        mean_type=d.model_mean_type,
        var_type=d.model_var_type,
        clip_denoised=d.clip_denoised,
    )


def save_native_pipeline(pipe: UnclipPipeline, folder: str | os.PathLike) -> Path:
    """Writes every loaded component as a native folder ``folder/<name>`` (+ ``diffusion.json`` for the stages)."""
    from unclip_jax.convert.native import save_native

    folder = Path(folder)
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        save_native(comp.module, comp.variables, folder / name)
        stage = stages.component(name).stage
        if stage and not (name == "prior" and prior_kind(comp.module) == "ar"):
            (folder / name / "diffusion.json").write_text(json.dumps(diffusion_fields(pipe.diffusions[stage])))
    return folder


def save_diffusers_pipeline(pipe: UnclipPipeline, folder: str | os.PathLike) -> Path:
    """Writes the pipeline in diffusers' ``UnCLIPPipeline`` (Karlo) folder layout (no torch needed), through the
    weight bridge (`unclip_jax.convert.pipeline.write_diffusers_pipeline`); a missing ``super_res_last`` is written
    as a copy of ``super_res_first``."""
    import tempfile

    from unclip_jax.convert import pipeline as karlo
    from unclip_jax.convert.scheduler import SCHEDULER_CONFIG, scheduler_config

    c = dict(pipe.components)
    c["super_res_last"] = c["super_res_last"] or c["super_res_first"]
    models = {name: (c[name].module, c[name].variables) for name in karlo.NETWORKS}
    files = {
        f"{s.scheduler}/{SCHEDULER_CONFIG}": json.dumps(scheduler_config(diffusion_fields(pipe.diffusions[s.name])))
        for s in stages.STAGES
        if s.scheduler
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok = pipe.tokenizer.save_hf_files(Path(tmp) / karlo.TOKENIZER)
        files.update({f"{karlo.TOKENIZER}/{p.name}": p.read_text() for p in sorted(tok.iterdir())})
    return karlo.write_diffusers_pipeline(karlo.UnCLIPBundle(models, files), folder)


__all__ = [
    "CASCADES",
    "diffusion_fields",
    "random_ar_prior",
    "random_components",
    "random_pipeline",
    "save_diffusers_pipeline",
    "save_native_pipeline",
]
