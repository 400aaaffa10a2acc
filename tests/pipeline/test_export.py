"""The exported decoder sampler (serialized StableHLO) draws the in-process pipeline's samples, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from unclip_jax.convert import formats
from unclip_jax.pipeline import StageSettings, testing
from unclip_jax.pipeline.export import export_sampler, prng_key_data

SETTINGS = {"decoder": StageSettings(25, "ddpm", guidance_scale=4.0)}


@pytest.fixture(scope="module")
def pipe():
    return testing.random_pipeline("test", seed=0)


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    return export_sampler(pipe, tmp_path_factory.mktemp("x") / "sampler", SETTINGS)


def _inputs(pipe, captions, seed):
    rng = np.random.default_rng(seed)
    text = pipe.text_inputs(captions)
    b = len(captions)
    dim = pipe.components["decoder"].module.clip_embeddings_dim
    size = pipe.components["decoder"].module.sample_size
    return dict(
        input_ids=text["input_ids"],
        text_mask=text["mask"],
        image_embeds=rng.standard_normal((b, dim)).astype(np.float32),
        x_T=rng.standard_normal((b, size, size, 3)).astype(np.float32),
        key=prng_key_data(seed),
    )


@pytest.mark.parametrize("captions", [["a red circle"], ["a blue square", "", "two yellow triangles"]])
def test_sampler_equals_the_pipeline_bit_for_bit(pipe, exported, captions):
    inputs = _inputs(pipe, captions, seed=len(captions))
    got = formats.load_export(exported)(**inputs)["images"]
    want = pipe.decode(
        inputs["image_embeds"],
        captions=captions,
        x_T=inputs["x_T"],
        seed=len(captions),
        settings=SETTINGS,
        stop_after="decoder",
    )["images"]
    assert got.shape == want.shape == (len(captions), *want.shape[1:])
    np.testing.assert_array_equal(got, want)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["settings"]["decoder"]["steps"] == 25 and manifest["settings"]["decoder"]["guidance_scale"] == 4.0


def test_sampler_runs_with_jax_alone(pipe, exported, tmp_path):
    """The README's few lines: jax + safetensors, no unclip_jax import."""
    inputs = _inputs(pipe, ["a red circle", "a star"], seed=7)
    np.savez(tmp_path / "inputs.npz", **inputs)
    code = f"""
import sys, numpy as np, jax
from safetensors.numpy import load_file
exported = jax.export.deserialize(bytearray(open({str(exported / "model.stablehlo")!r}, "rb").read()))
flat = load_file({str(exported / "weights.safetensors")!r})
tree = {{}}
for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for k in parents:
        node = node.setdefault(k, {{}})
    node[leaf] = value
(expected, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
weights = jax.tree.map(lambda aval, a: np.reshape(a, aval.shape), expected, tree)
x = np.load({str(tmp_path / "inputs.npz")!r})
(images,) = exported.call(weights, x["input_ids"], x["text_mask"], x["image_embeds"], x["x_T"], x["key"])
assert "unclip_jax" not in sys.modules
np.save({str(tmp_path / "out.npy")!r}, np.asarray(images))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    want = formats.load_export(exported)(**inputs)["images"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
