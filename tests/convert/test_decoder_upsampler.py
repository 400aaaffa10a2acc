"""Weight bridge of the decoder, text_proj and super-resolution folders (convert/decoder.py, convert/upsampler.py):
export -> diffusers from_pretrained -> same output; import(export) bit-exact; bad folders are named errors."""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_decoder import torch_forward as torch_decoder_forward
from unclip_jax.convert import decoder as cd
from unclip_jax.convert import io, registry
from unclip_jax.convert import upsampler as cu
from unclip_jax.models import decoder, upsampler


def _random_params(module, *args, seed: int = 1, **kwargs):
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    vals = [
        jnp.asarray(0.05 * rng.standard_normal(a.shape) + (1.0 if str(p[-1].key) == "scale" else 0.0), jnp.float32)
        for p, a in flat
    ]
    return jax.tree.unflatten(tree, vals)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The 'test' decoder and upsampler with random params, exported once."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    m = decoder.build("test")
    d = m.clip_embeddings_dim
    mask = np.ones((2, 6), bool)
    mask[1, 2:] = False
    dec_inp = dict(
        x_t=rng.standard_normal((2, 16, 16, 3)).astype(np.float32),
        t=np.array([5, 800]),
        image_embeds=rng.standard_normal((2, d)).astype(np.float32),
        text_embeds=rng.standard_normal((2, d)).astype(np.float32),
        text_hidden_states=rng.standard_normal((2, 6, d)).astype(np.float32),
        text_mask=mask,
    )
    dec_params = _random_params(m, **dec_inp)
    cd.save_unclip_decoder(m, dec_params, root)
    u = upsampler.build("test")
    up_inp = (rng.standard_normal((2, 16, 24, 6)).astype(np.float32), np.array([5, 800]))
    up_params = _random_params(u, *up_inp)
    cu.save_upsampler(u, up_params, root / "super_res_first")
    return root, (m, dec_params, dec_inp), (u, up_params, up_inp)


def test_import_of_export_is_bit_exact(exported):
    root, (m, dec_params, _), (u, up_params, _) = exported
    module, variables = cd.load_unclip_decoder(root)
    assert module == m
    _assert_tree_equal(variables, dec_params)
    module, variables = cd.load_decoder(root)  # pipeline folder -> its decoder/
    assert module == decoder.Decoder(**m.unet_kwargs())
    _assert_tree_equal(variables["params"], dec_params["params"]["unet"])
    module, variables = cd.load_text_proj(root / "text_proj")
    _assert_tree_equal(variables["params"], dec_params["params"]["text_proj"])
    module, variables = cu.load_upsampler(root, "super_res_first")
    assert module == u
    _assert_tree_equal(variables, up_params)
    # bf16 params import as bf16 (param_dtype override), values rounded from the float32 file.
    module, variables = cu.load_upsampler(root, "super_res_first", param_dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.torch
def test_export_loads_in_diffusers_with_same_output(torch_threads, exported):
    torch = torch_threads
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    root, (m, dec_params, inp), (u, up_params, up_inp) = exported
    unet = UNet2DConditionModel.from_pretrained(root / "decoder").eval()
    proj = UnCLIPTextProjModel.from_pretrained(root / "text_proj").eval()
    want, _, _ = torch_decoder_forward(torch, unet, proj, inp)
    got = np.asarray(jax.jit(m.apply)(dec_params, **inp))
    diff = float(np.abs(got - want).max())
    print(f"exported decoder in diffusers: max abs diff {diff:.2e}")
    assert diff <= 1e-4

    ref = UNet2DModel.from_pretrained(root / "super_res_first").eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(up_inp[0]).permute(0, 3, 1, 2), torch.from_numpy(up_inp[1])).sample
    got = np.asarray(jax.jit(u.apply)(up_params, *up_inp))
    diff = float(np.abs(got - want.permute(0, 2, 3, 1).numpy()).max())
    print(f"exported upsampler in diffusers: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def _edit_weights(folder, fn):
    path = io.find_weights(folder)
    state = io.read_safetensors(path)
    fn(state)
    from safetensors.numpy import save_file

    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(folder, fn):
    cfg = json.loads((folder / io.CONFIG).read_text())
    fn(cfg)
    (folder / io.CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "component,edit,match",
    [
        (
            "decoder",
            lambda f: _edit_weights(f, lambda s: s.pop("mid_block.attentions.0.add_k_proj.weight")),
            r"missing keys \(1\): \['mid_block.attentions.0.add_k_proj.weight'\]",
        ),
        (
            "decoder",
            lambda f: _edit_weights(f, lambda s: s.update({"extra.weight": np.zeros(3, np.float32)})),
            r"unexpected keys \(1\): \['extra.weight'\]",
        ),
        (
            "decoder",
            lambda f: _edit_weights(f, lambda s: s.update({"conv_in.weight": np.zeros((32, 3, 3, 1), np.float32)})),
            r"conv_in.weight: shape \(32, 3, 3, 1\), expected \(32, 3, 3, 3\)",
        ),
        (
            "decoder",
            lambda f: _edit_config(f, lambda c: c.pop("block_out_channels")),
            r"lacks required field\(s\) \['block_out_channels'\]",
        ),
        (
            "decoder",
            lambda f: _edit_config(f, lambda c: c.update(only_cross_attention=True)),
            r"only_cross_attention=True",
        ),
        (
            "decoder",
            lambda f: _edit_config(f, lambda c: c.update(mid_block_type="UNetMidBlock2DCrossAttn")),
            r"mid_block_type='UNetMidBlock2DCrossAttn'",
        ),
        ("decoder", lambda f: (f / io.DIFFUSERS_WEIGHTS).unlink(), r"expected one safetensors weights file"),
        (
            "text_proj",
            lambda f: _edit_config(f, lambda c: c.pop("time_embed_dim")),
            r"lacks required field\(s\) \['time_embed_dim'\]",
        ),
        (
            "text_proj",
            lambda f: _edit_weights(f, lambda s: s.pop("learned_classifier_free_guidance_embeddings")),
            r"missing keys \(1\): \['learned_classifier_free_guidance_embeddings'\]",
        ),
        ("super_res_first", lambda f: _edit_config(f, lambda c: c.update(add_attention=True)), r"add_attention=True"),
        (
            "super_res_first",
            lambda f: _edit_config(f, lambda c: c.pop("add_attention")),
            r"lacks required field\(s\) \['add_attention'\]",
        ),
        (
            "super_res_first",
            lambda f: _edit_weights(f, lambda s: s.pop("up_blocks.0.upsamplers.0.conv1.bias")),
            r"up_blocks.0.upsamplers.0.conv1.bias",
        ),
    ],
)
def test_bad_folders_are_named_errors(exported, tmp_path, component, edit, match):
    root = exported[0]
    folder = tmp_path / component
    shutil.copytree(root / component, folder)
    edit(folder)
    with pytest.raises(io.ConversionError, match=match) as e:
        registry.converter(component).load(folder)
    assert str(folder) in str(e.value)


def test_mismatched_text_proj_is_an_error(exported, tmp_path):
    root, (m, _, _), _ = exported
    shutil.copytree(root, tmp_path / "p")
    proj = decoder.UnCLIPTextProj(**{**m.text_proj_kwargs(), "time_embed_dim": 64})
    d = proj.clip_embeddings_dim
    params = _random_params(proj, np.zeros((1, d)), np.zeros((1, d)), np.zeros((1, 1, d)))
    cd.save_text_proj(proj, params, tmp_path / "p" / "text_proj")
    with pytest.raises(io.ConversionError, match="does not fit the decoder"):
        cd.load_unclip_decoder(tmp_path / "p")
