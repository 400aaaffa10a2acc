"""The rule-based weight mapping and the atomic folder writer of unclip_jax/convert."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from unclip_jax.convert import io, mapping


def _rules():
    return [
        *mapping.linear(("proj",), "proj"),
        *mapping.conv(("conv_in",), "conv_in"),
        *mapping.norm(("norm",), "norm"),
        mapping.Rule(("shortcut", "kernel"), "shortcut.weight", "conv1x1_linear"),
        mapping.Rule(("pos",), "pos"),
    ]


def _torch_state(rng):
    return {
        "proj.weight": rng.normal(size=(5, 3)).astype(np.float32),
        "proj.bias": rng.normal(size=(5,)).astype(np.float32),
        "conv_in.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "conv_in.bias": rng.normal(size=(4,)).astype(np.float32),
        "norm.weight": rng.normal(size=(4,)).astype(np.float32),
        "norm.bias": rng.normal(size=(4,)).astype(np.float32),
        "shortcut.weight": rng.normal(size=(6, 4, 1, 1)).astype(np.float32),
        "pos": rng.normal(size=(7, 5)).astype(np.float32),
    }


def test_layout_transforms_match_the_torch_conventions():
    rng = np.random.default_rng(0)
    state = _torch_state(rng)
    params = mapping.torch_to_flax(state, _rules())
    x = rng.normal(size=(2, 3)).astype(np.float32)
    # nn.Linear: y = x W^T + b ; Dense: y = x K + b.
    np.testing.assert_allclose(x @ params["proj"]["kernel"], x @ state["proj.weight"].T, rtol=1e-6)
    # Conv2d weight [out, in, kh, kw] -> [kh, kw, in, out].
    np.testing.assert_array_equal(params["conv_in"]["kernel"][1, 2, 0, 3], state["conv_in.weight"][3, 0, 1, 2])
    np.testing.assert_array_equal(params["shortcut"]["kernel"], state["shortcut.weight"][:, :, 0, 0].T)
    assert params["norm"]["scale"] is not None and "weight" not in params["norm"]


def test_round_trip_is_bit_exact():
    state = _torch_state(np.random.default_rng(1))
    back = mapping.flax_to_torch(mapping.torch_to_flax(state, _rules()), _rules())
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype
        np.testing.assert_array_equal(back[k], state[k])


def test_every_problem_is_listed_by_name():
    rng = np.random.default_rng(2)
    state = _torch_state(rng)
    expected = mapping.torch_to_flax(state, _rules())
    del state["norm.bias"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["pos"] = np.zeros((8, 5), np.float32)
    with pytest.raises(io.ConversionError) as e:
        mapping.torch_to_flax(state, _rules(), expected=expected, where="prior/diffusion_pytorch_model.safetensors")
    msg = str(e.value)
    assert "prior/diffusion_pytorch_model.safetensors" in msg
    assert "missing keys (1): ['norm.bias']" in msg
    assert "unexpected keys (1): ['extra.weight']" in msg
    assert "pos: shape (8, 5), expected (7, 5)" in msg


def test_duplicate_rules_are_rejected():
    with pytest.raises(ValueError, match="duplicate torch"):
        mapping.torch_to_flax({}, [mapping.Rule(("a",), "x"), mapping.Rule(("b",), "x")])


def test_export_rejects_parameters_without_rules():
    params = mapping.torch_to_flax(_torch_state(np.random.default_rng(3)), _rules())
    params["stray"] = {"kernel": np.zeros(2)}
    with pytest.raises(io.ConversionError, match="stray/kernel"):
        mapping.flax_to_torch(params, _rules())


def test_write_folder_round_trip_and_replacement(tmp_path):
    state = _torch_state(np.random.default_rng(4))
    out = io.write_folder(tmp_path / "prior", {"num_layers": 2}, state)
    assert io.read_config(out) == {"num_layers": 2}
    loaded = io.read_safetensors(io.find_weights(out))
    for k in state:
        np.testing.assert_array_equal(loaded[k], state[k])
    io.write_folder(tmp_path / "prior", {"num_layers": 3}, state)
    assert io.read_config(out)["num_layers"] == 3
    assert sorted(os.listdir(tmp_path)) == ["prior"]


def test_interrupted_write_leaves_nothing_that_looks_valid(tmp_path):
    class Boom(dict):
        def items(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_folder(tmp_path / "decoder", {"a": 1}, Boom())
    assert os.listdir(tmp_path) == []


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(io.ConversionError, match="config.json: missing"):
        io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(io.ConversionError, match="not valid JSON"):
        io.read_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(io.ConversionError, match="pickle is never loaded"):
        io.find_weights(tmp_path)
    with pytest.raises(io.ConversionError, match=r"lacks required field\(s\) \['num_layers'\]"):
        io.require_fields(json.loads('{"a": 1}'), ["a", "num_layers"], "prior")


def test_bf16_safetensors_are_read_as_float32(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    try:
        save_file({"w": a.astype(ml_dtypes.bfloat16)}, str(tmp_path / "m.safetensors"))
    except Exception:  # this safetensors cannot write bf16 from numpy: write the header by hand
        header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
        raw = a.astype(ml_dtypes.bfloat16).tobytes()
        (tmp_path / "m.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    out = io.read_safetensors(tmp_path / "m.safetensors")
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], a)
