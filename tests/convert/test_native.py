"""Native folders (config.json + params.safetensors) and the ``unclip convert`` command."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import commands, io
from unclip_jax.convert.native import load_native, save_native
from unclip_jax.models import clip, prior


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory):
    module = prior.build("test", learned_null_text=True, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    variables = jax.jit(module.init)(jax.random.key(0), **prior.example_inputs(module))
    folder = tmp_path_factory.mktemp("native") / "prior"
    save_native(module, variables, folder, variant="test")
    return module, variables, folder


def test_prior_roundtrip_bit_exact(prior_folder):
    module, variables, folder = prior_folder
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["variant"] == "test" and cfg["kwargs"]["param_dtype"] == "bfloat16"
    loaded_module, loaded = load_native(folder)
    assert loaded_module == module and hash(loaded_module) == hash(module)  # jit caches keyed on it must hit
    _same(jax.tree.map(np.asarray, nn.unbox(variables)), loaded)
    assert loaded["params"]["proj_in"]["kernel"].dtype == jnp.bfloat16
    assert set(loaded) == {"params", "stats"}


def test_clip_nested_kwargs_and_bare_params(tmp_path):
    module = clip.build("test")
    ids = jnp.zeros((1, 77), jnp.int32)
    img = jnp.zeros((1, 32, 32, 3))
    params = jax.jit(module.init)(jax.random.key(0), ids, img)["params"]
    save_native(module, params, tmp_path / "clip")  # a bare params tree is accepted
    loaded_module, loaded = load_native(tmp_path / "clip")
    assert loaded_module.text["layers"] == module.text["layers"] and loaded_module.projection_dim == 32
    assert loaded_module == module and hash(loaded_module) == hash(module)  # nested tower kwargs stay hashable
    _same(jax.tree.map(np.asarray, nn.unbox(params)), loaded["params"])


def test_native_errors(prior_folder, tmp_path):
    _, _, folder = prior_folder
    cfg = json.loads((folder / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(io.ConversionError, match="format 'unclip_jax' v99"):
        load_native(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "module": "os.system"}))
    with pytest.raises(io.ConversionError, match="not under unclip_jax.models"):
        load_native(bad)
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "kwargs"}))
    with pytest.raises(io.ConversionError, match=r"\['kwargs'\]"):
        load_native(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(io.ConversionError, match="params.safetensors: missing"):
        load_native(bad)


@pytest.mark.torch
def test_cli_import_export_prior(torch_threads, tmp_path, capsys):
    from diffusers import PriorTransformer

    cfg = prior.VARIANTS["test"]
    ref = PriorTransformer(**cfg)
    ref.save_pretrained(tmp_path / "diffusers")
    assert (
        commands.main(["convert", "import", "--component", "prior", str(tmp_path / "diffusers"), str(tmp_path / "n")])
        == 0
    )
    module, variables = load_native(tmp_path / "n")
    assert isinstance(module, prior.PriorTransformer) and module.num_layers == cfg["num_layers"]
    assert (
        commands.main(["convert", "export", "--component", "prior", str(tmp_path / "n"), str(tmp_path / "back")]) == 0
    )
    back = PriorTransformer.from_pretrained(tmp_path / "back")
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy())
    # Wrong component for the folder's module, and a bad source folder: exit code 1 and a message.
    assert (
        commands.main(["convert", "export", "--component", "text_encoder", str(tmp_path / "n"), str(tmp_path / "x")])
        == 1
    )
    assert "expects CLIPTextModel" in capsys.readouterr().out
    assert (
        commands.main(["convert", "import", "--component", "prior", str(tmp_path / "nowhere"), str(tmp_path / "y")])
        == 1
    )
    assert "config.json: missing" in capsys.readouterr().out
    assert not (tmp_path / "y").exists()


def test_learned_null_prior_does_not_export(prior_folder, tmp_path):
    from unclip_jax.convert.prior import save_prior

    module, variables, _ = prior_folder
    with pytest.raises(io.ConversionError, match="null_text_embedding"):
        save_prior(module, variables, tmp_path / "out")
    assert not (tmp_path / "out").exists()
