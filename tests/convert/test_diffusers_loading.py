"""Exported pipeline folders load with diffusers' own UnCLIPPipeline after the documented call."""

from __future__ import annotations

import json

import pytest

from unclip_jax.convert import pipeline as cp
from unclip_jax.input.tokenizer import ClipTokenizer
from unclip_jax.pipeline import testing


@pytest.mark.torch
@pytest.mark.parametrize("text_proj_entry", ["written", ["unclip", "UnCLIPTextProjModel"]])
def test_exported_folder_loads_in_diffusers(torch_threads, tmp_path, text_proj_entry):
    from diffusers import UnCLIPPipeline

    testing.save_native_pipeline(testing.random_pipeline("test", seed=0), tmp_path / "native")
    bundle = cp.load_native_bundle(tmp_path / "native")  # no source model_index.json: ours is written
    ClipTokenizer().save_hf_files(tmp_path / "tok")
    bundle.files.update({f"tokenizer/{f.name}": f.read_text() for f in (tmp_path / "tok").iterdir()})
    folder = cp.write_diffusers_pipeline(bundle, tmp_path / "exported")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]  # what diffusers 0.42.1 itself writes
    if text_proj_entry != "written":  # the original Karlo folder's entry
        index["text_proj"] = text_proj_entry
        (folder / "model_index.json").write_text(json.dumps(index))
    cp.register_diffusers_aliases()
    pipe = UnCLIPPipeline.from_pretrained(folder)
    assert type(pipe.text_proj).__name__ == "UnCLIPTextProjModel"
    assert pipe.decoder.config.sample_size == bundle.models["decoder"][0].sample_size
