"""Every network exported to ONNX, SavedModel and StableHLO runs in that runtime and equals the Flax forward."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from unclip_jax.convert import formats
from unclip_jax.convert.formats.signatures import signature_of
from unclip_jax.models import ar_prior, clip, decoder, prior, upsampler

NETWORKS = {
    "prior": lambda: (prior.build("test"), None),
    "ar_prior": lambda: (ar_prior.build("test"), None),
    "text_encoder": lambda: (clip.build_text("test"), None),
    "image_encoder": lambda: (clip.build_vision("test"), None),
    "clip_text": lambda: (clip.build("test"), "text_encoder"),
    "decoder": lambda: (decoder.build("test"), None),
    "super_res": lambda: (upsampler.build("test"), None),
}


def _variables(module, component):
    """Initialised variables with every float leaf perturbed (zero-initialised output layers give zeros)."""
    sig = signature_of(module, None, component)
    inputs = list(sig.example(2).values())
    if hasattr(module, "tower_kwargs"):  # two-tower CLIP: init needs both towers' inputs
        other = signature_of(module, None, "image_encoder").example(2)["pixel_values"]
        inputs = [inputs[0], other]
    variables = nn.unbox(module.init(jax.random.key(0), *inputs))
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype) if np.issubdtype(x.dtype, np.floating) else x
            for k, x in zip(keys, leaves)
        ],
    )


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def network(request):
    module, component = NETWORKS[request.param]()
    return request.param, module, component, _variables(module, component)


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_export_runs_back_equal_at_two_batch_sizes(network, fmt, tmp_path):
    name, module, component, variables = network
    folder = formats.export_network(module, variables, tmp_path / f"{name}.{fmt}", fmt, component=component)
    exported = formats.load_export(folder)
    sig = signature_of(module, variables, component)
    ours = jax.jit(sig.fn)
    for batch in (1, 3):
        inputs = sig.example(batch, seed=batch)
        want = ours(variables, *inputs.values())
        got = exported(**inputs)
        assert list(got) == [s.name for s in sig.outputs]
        for (out_name, g), w in zip(got.items(), want):
            assert g.shape == w.shape, (name, fmt, out_name)
            np.testing.assert_allclose(g, np.asarray(w), atol=1e-4, rtol=0, err_msg=f"{name} {fmt} {out_name}")
    manifest = exported.manifest
    assert manifest["format"] == fmt and manifest["network"] == type(module).__name__
    assert manifest["inputs"][0]["shape"][0] == "batch"
    assert all(oct(os.stat(folder / f).st_mode & 0o777) != "0o700" for f in manifest["files"])


def test_manifest_guards_version_missing_files_and_checksums(tmp_path):
    module = prior.build("test")
    variables = _variables(module, None)
    folder = formats.export_network(module, variables, tmp_path / "p", "stablehlo")
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(formats.ExportError, match=r"weights\.safetensors does not match its checksum"):
        formats.load_export(folder)
    weights.unlink()
    with pytest.raises(formats.ExportError, match=r"weights\.safetensors is missing"):
        formats.load_export(folder)
    manifest["format_version"] = "2.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(formats.ExportError, match=r"format_version '2\.0' is not readable"):
        formats.load_export(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(formats.ExportError, match="no manifest.json"):
        formats.load_export(folder)


def test_unknown_format_and_failed_export_leave_nothing(tmp_path):
    module = prior.build("test")
    variables = _variables(module, None)
    with pytest.raises(formats.ExportError, match="--format 'tflite'"):
        formats.export_network(module, variables, tmp_path / "x", "tflite")

    def broken(v, x):
        raise RuntimeError("no such op")

    sig = formats.signatures.Signature(
        inputs=(formats.spec_of("x", ("batch", 2)),), outputs=(formats.spec_of("y", ("batch", 2)),), fn=broken
    )
    with pytest.raises(formats.ExportError, match=r"program: cannot be exported as onnx \(RuntimeError: no such op\)"):
        formats.write_signature_export(sig, {}, tmp_path / "y", "onnx", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_export_formats_and_unsupported_pairs(tmp_path, capsys):
    from unclip_jax.convert import commands
    from unclip_jax.convert.native import save_native

    module = upsampler.build("test")
    variables = _variables(module, None)
    save_native(module, variables, tmp_path / "sr", extra_files={"diffusion.json": '{"schedule": "cosine"}'})
    argv = ["convert", "export", "--component", "super_res_first", "--format", "stablehlo"]
    assert commands.main([*argv, str(tmp_path / "sr"), str(tmp_path / "out")]) == 0
    exported = formats.load_export(tmp_path / "out")
    assert exported.manifest["component"] == "super_res_first"
    assert exported.manifest["diffusion"] == {"schedule": "cosine"}
    assert exported.manifest["source_config"]["module"].endswith("SuperResUNet")
    inputs = signature_of(module, variables).example(2)
    want = signature_of(module, variables).fn(variables, *inputs.values())[0]
    np.testing.assert_allclose(exported(**inputs)["model_output"], np.asarray(want), atol=1e-5)
    capsys.readouterr()
    for component, fmt, message in [
        ("pipeline", "onnx", "--component pipeline cannot be exported as onnx"),
        ("text_proj", "savedmodel", "--component text_proj cannot be exported as savedmodel"),
        ("prior", "onnx", "holds a SuperResUNet, but --component prior expects"),
    ]:
        argv = [
            "convert",
            "export",
            "--component",
            component,
            "--format",
            fmt,
            str(tmp_path / "sr"),
            str(tmp_path / "x"),
        ]
        assert commands.main(argv) == 1
        (line,) = capsys.readouterr().out.strip().splitlines()
        assert message in line, line
    argv = ["convert", "import", "--component", "prior", "--format", "onnx", str(tmp_path / "sr"), str(tmp_path / "x")]
    assert commands.main(argv) == 1
    assert "applies to export only" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
