"""Folders written by main 03a46a7 (before the converter registry) still load, with the same outputs.

``tests/fixtures/legacy_03a46a7/`` was written by :func:`write_fixtures` run against commit 03a46a7
(``PYTHONPATH=<checkout of 03a46a7> python tests/convert/test_legacy.py``):

- ``native/``: a ``test``-size random cascade saved as native component folders (``pipeline.testing``'s
  ``save_native_pipeline``: ``config.json`` + ``params.safetensors`` + ``diffusion.json``), plus a native
  ``ar_prior/``, a two-tower ``clip/`` and an ``upsampler_1024/`` with a linear-schedule ``diffusion.json``;
- ``karlo/``: the same cascade in diffusers' ``UnCLIPPipeline`` (Karlo) layout (``save_diffusers_pipeline``),
  without the tokenizer's ``vocab.json`` / ``merges.txt`` (only ``tokenizer_config.json`` is read when loading);
- ``reference.json``: what the old code read from them: per component the parameter count and sum and a few
  numbers of the network's output on fixed inputs, per stage the training diffusion, and the tokenizer's pad token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "legacy_03a46a7"
REQUIRE = ("text_encoder", "prior", "decoder", "super_res_first", "super_res_last", "image_encoder")


def _inputs(module: Any, variables: dict[str, Any]) -> tuple[tuple, dict]:
    """Fixed random inputs for a network of the cascade (batch 2, by module class)."""
    rng = np.random.default_rng(0)
    name = type(module).__name__

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def ids(length, high):
        return jnp.asarray(rng.integers(0, high, (2, length)), jnp.int32)

    if name == "CLIPTextModel":
        return (ids(module.context_length, module.vocab_size),), {}
    if name == "CLIPVisionModel":
        return (normal(2, module.image_size, module.image_size, module.num_channels),), {}
    if name == "CLIP":
        text, vision = dict(module.text), dict(module.vision)
        return (
            ids(text["context_length"], text["vocab_size"]),
            normal(2, vision["image_size"], vision["image_size"], 3),
        ), {}
    if name in ("PriorTransformer", "ARPrior"):
        from unclip_jax.models import ar_prior, prior

        lib = prior if name == "PriorTransformer" else ar_prior
        kwargs = {}
        for k, v in lib.example_inputs(module, 2).items():
            if v is None or v.dtype == jnp.bool_:
                kwargs[k] = v
            elif jnp.issubdtype(v.dtype, jnp.integer):
                kwargs[k] = jnp.asarray(rng.integers(0, 2, v.shape), v.dtype)
            else:
                kwargs[k] = normal(*v.shape)
        return (), kwargs
    if name == "UnCLIPDecoder":
        s, d = module.sample_size, module.clip_embeddings_dim
        proj = variables.get("params", {}).get("text_proj", {}).get("encoder_hidden_states_proj", {})
        width = proj["kernel"].shape[0] if proj else d  # the CLIP text width (= d in the test variants)
        return (normal(2, s, s, 3), jnp.asarray([3, 700]), normal(2, d), normal(2, d), normal(2, 5, width)), {}
    if name == "SuperResUNet":
        s = module.sample_size
        return (normal(2, s, s, 3), jnp.asarray([3, 700]), normal(2, s, s, module.in_channels - 3)), {}
    raise TypeError(f"no fixed inputs for {name}")


def component_summary(module: Any, variables: dict[str, Any]) -> dict[str, Any]:
    """Parameter count and sum, and the sum, absolute sum and first values of every output on fixed inputs."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(variables)]
    args, kwargs = _inputs(module, variables)
    out = module.apply(variables, *args, **kwargs)
    outputs = []
    for leaf in jax.tree.leaves(out):
        a = np.asarray(leaf, np.float64).reshape(-1)
        outputs.append([float(a.sum()), float(np.abs(a).sum()), *map(float, a[:4])])
    return {
        "module": type(module).__name__,
        "param_count": int(sum(x.size for x in leaves)),
        "param_sum": float(sum(x.sum() for x in leaves)),
        "outputs": outputs,
    }


def diffusion_summary(d: Any) -> dict[str, Any]:
    return {
        "num_timesteps": int(d.num_timesteps),
        "betas_sum": float(np.sum(np.asarray(d.betas, np.float64))),
        "mean_type": d.model_mean_type,
        "var_type": d.model_var_type,
        "clip_denoised": d.clip_denoised,
    }


def pipeline_summary(pipe: Any) -> dict[str, Any]:
    comps = {n: c for n, c in pipe.components.items() if c is not None}
    return {
        "components": {n: component_summary(c.module, c.variables) for n, c in sorted(comps.items())},
        "diffusions": {s: diffusion_summary(d) for s, d in sorted(pipe.diffusions.items())},
        "pad_token": pipe.tokenizer.pad_token,
    }


def write_fixtures(root: Path = FIXTURES) -> None:
    """Writes the fixture folders and ``reference.json`` with the code on the path (run against 03a46a7)."""
    from unclip_jax.convert.native import load_native, save_native
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models import clip, decoder, prior, upsampler
    from unclip_jax.pipeline import testing
    from unclip_jax.pipeline.loading import load_pipeline

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)

    def random(module: Any) -> Any:
        return testing.Component(module, testing.random_variables(module, rng, *_inputs(module, {})[0]))

    # The test variants, narrowed where their weights would make the fixture large (vocabulary, U-Net widths).
    text = clip.build_text("test", vocab_size=256, layers=1)
    prior_module = prior.build("test", num_layers=1)
    comps = {
        "text_encoder": random(text),
        "image_encoder": random(clip.build_vision("test", layers=1)),
        "prior": testing.Component(
            prior_module, testing.random_variables(prior_module, rng, **_inputs(prior_module, {})[1])
        ),
        "decoder": random(decoder.build("test", model_channels=8, num_head_channels=8, norm_num_groups=4)),
        "super_res_first": random(upsampler.build("test", model_channels=4, norm_num_groups=2)),
        "super_res_last": random(upsampler.build("test", model_channels=4, norm_num_groups=2)),
    }
    dim = prior_module.out_dim
    comps["prior"].variables["stats"] = {
        "clip_mean": (0.1 * rng.standard_normal((1, dim))).astype(np.float32),
        "clip_std": (1.0 + 0.2 * rng.uniform(size=(1, dim))).astype(np.float32),
    }
    pipe = testing.UnclipPipeline(ClipTokenizer(pad_token="!"), **comps)
    testing.save_native_pipeline(pipe, root / "native")
    testing.save_diffusers_pipeline(pipe, root / "karlo")
    for name in ("vocab.json", "merges.txt"):
        (root / "karlo" / "tokenizer" / name).unlink()
    ar = testing.random_ar_prior("test", seed=3, width=32, num_layers=1)
    save_native(ar.module, ar.variables, root / "native" / "ar_prior")
    tower = {**clip.VARIANTS["test"]["text"], "vocab_size": 256, "layers": 1}
    two = clip.build("test", text=tower, vision={**clip.VARIANTS["test"]["vision"], "layers": 1})
    save_native(two, random(two).variables, root / "native" / "clip")
    up = upsampler.build("test", model_channels=4, norm_num_groups=2)
    save_native(up, random(up).variables, root / "native" / "upsampler_1024")
    linear = dict(steps=1000, schedule="linear", mean_type="epsilon", var_type="fixed_small_log", clip_denoised=1.0)
    (root / "native" / "upsampler_1024" / "diffusion.json").write_text(json.dumps(linear))

    ref: dict[str, Any] = {
        "karlo": pipeline_summary(load_pipeline(root / "karlo", require=REQUIRE[:-1])),
        "native": pipeline_summary(load_pipeline(root / "native", require=(*REQUIRE, "upsampler_1024"))),
        "native_ar": pipeline_summary(load_pipeline(root / "native", prior_kind="ar")),
        "folders": {},
    }
    for name in ("clip", "ar_prior", "upsampler_1024"):
        ref["folders"][name] = component_summary(*load_native(root / "native" / name))
    (root / "reference.json").write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------- tests
def _reference() -> dict[str, Any]:
    return json.loads((FIXTURES / "reference.json").read_text())


def _assert_summary_equal(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert got["module"] == want["module"], where
    assert got["param_count"] == want["param_count"], where
    np.testing.assert_allclose(got["param_sum"], want["param_sum"], rtol=1e-12, err_msg=where)
    assert len(got["outputs"]) == len(want["outputs"]), where
    for g, w in zip(got["outputs"], want["outputs"]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=where)


def _assert_pipeline_equal(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert sorted(got["components"]) == sorted(want["components"]), where
    for name in want["components"]:
        _assert_summary_equal(got["components"][name], want["components"][name], f"{where}: {name}")
    assert sorted(got["diffusions"]) == sorted(want["diffusions"]), where
    for stage, d in want["diffusions"].items():
        g = dict(got["diffusions"][stage])
        np.testing.assert_allclose(g.pop("betas_sum"), d["betas_sum"], rtol=1e-12, err_msg=f"{where}: {stage}")
        assert g == {k: v for k, v in d.items() if k != "betas_sum"}, f"{where}: {stage} diffusion"
    assert got["pad_token"] == want["pad_token"], where


@pytest.mark.parametrize(
    "folder,kwargs",
    [
        ("karlo", dict(require=REQUIRE[:-1])),
        ("native", dict(require=(*REQUIRE, "upsampler_1024"))),
        ("native_ar", dict(prior_kind="ar")),
    ],
)
def test_legacy_pipeline_folder_loads_with_the_same_outputs(folder, kwargs):
    from unclip_jax.pipeline.loading import load_pipeline

    pipe = load_pipeline(FIXTURES / folder.removesuffix("_ar"), **kwargs)
    _assert_pipeline_equal(pipeline_summary(pipe), _reference()[folder], folder)


@pytest.mark.parametrize("name", ["clip", "ar_prior", "upsampler_1024"])
def test_legacy_native_folder_loads_with_the_same_outputs(name):
    from unclip_jax.convert.native import load_native

    want = _reference()["folders"][name]
    _assert_summary_equal(component_summary(*load_native(FIXTURES / "native" / name)), want, name)


def test_legacy_karlo_folder_imports_through_the_registry():
    """The Karlo folder read component by component through the converter registry (what ``convert import`` does)."""
    from unclip_jax.convert import pipeline as cp

    bundle = cp.read_diffusers_pipeline(FIXTURES / "karlo")
    want = _reference()["karlo"]["components"]
    for name, (module, variables) in bundle.models.items():
        _assert_summary_equal(component_summary(module, variables), want[name], f"karlo {name}")


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    write_fixtures()
