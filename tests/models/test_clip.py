"""CLIP towers: shapes, EOT pooling, bf16, preprocessing, parameter counts."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import clip


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _inputs(module: clip.CLIP, b: int = 2):
    v = module.vision
    ids = np.zeros((b, module.text["context_length"]), np.int32)
    ids[:, 0] = 49406
    ids[:, 1:4] = [[320, 1125, 539]] * b
    ids[:, 4] = 49407
    img = np.random.default_rng(0).normal(size=(b, v["image_size"], v["image_size"], 3)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(img)


@pytest.fixture(scope="module")
def setup():
    module = clip.build("test")
    ids, img = _inputs(module)
    variables = jax.jit(module.init)(jax.random.key(0), ids, img)
    return module, variables, ids, img


def test_forward_shapes_and_logit_scale(setup):
    module, variables, ids, img = setup
    out = jax.jit(module.apply)(variables, ids, img)
    p = module.projection_dim
    assert out["text_embeds"].shape == (2, p) and out["image_embeds"].shape == (2, p)
    assert out["last_hidden_state"].shape == (2, ids.shape[1], module.text["width"])
    np.testing.assert_allclose(float(out["logit_scale"]), math.log(1 / 0.07), rtol=1e-6)
    t = module.apply(variables, ids, method="encode_text")
    np.testing.assert_allclose(np.asarray(t["text_embeds"]), np.asarray(out["text_embeds"]), atol=1e-5)
    v = module.apply(variables, img, method="encode_image")
    np.testing.assert_allclose(np.asarray(v["image_embeds"]), np.asarray(out["image_embeds"]), atol=1e-5)


def test_text_embeds_pool_at_end_token(setup):
    module, variables, ids, _ = setup
    enc = jax.jit(lambda v, i: module.apply(v, i, method="encode_text"))
    base = enc(variables, ids)
    # Tokens after the end token (padding, '!' or eos) cannot change the causal, EOT-pooled output.
    padded = ids.at[:, 5:].set(49407)
    out = enc(variables, padded)
    np.testing.assert_allclose(np.asarray(out["text_embeds"]), np.asarray(base["text_embeds"]), atol=1e-5)
    # The pooled vector is the final-LN hidden state at the end token.
    np.testing.assert_allclose(np.asarray(base["pooled_output"]), np.asarray(base["last_hidden_state"][:, 4]), atol=0)
    changed = enc(variables, ids.at[:, 2].set(2368))
    assert not np.allclose(np.asarray(changed["text_embeds"]), np.asarray(base["text_embeds"]), atol=1e-4)


def test_bf16_compute_runs(setup):
    _, variables, ids, img = setup
    out = jax.jit(clip.build("test", dtype=jnp.bfloat16).apply)(variables, ids, img)
    assert out["image_embeds"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out["text_embeds"].astype(jnp.float32))))


def test_towers_standalone_share_the_layout(setup):
    module, variables, ids, img = setup
    text = clip.build_text("test")
    out = text.apply({"params": variables["params"]["text_model"]}, ids)
    ref = module.apply(variables, ids, method="encode_text")
    np.testing.assert_array_equal(np.asarray(out["text_embeds"]), np.asarray(ref["text_embeds"]))
    vision = clip.build_vision("test")
    with pytest.raises(ValueError, match="NHWC"):
        vision.apply({"params": variables["params"]["vision_model"]}, jnp.moveaxis(img, -1, 1))


def test_preprocess_images():
    img = np.full((2, 48, 64, 3), 255, np.uint8)
    out = clip.preprocess_images(jnp.asarray(img), 32)
    assert out.shape == (2, 32, 32, 3)
    want = (1.0 - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(want, out.shape), atol=1e-4)


def _counts(variant):
    text, vision = clip.build_text(variant), clip.build_vision(variant)
    t = nn.unbox(jax.eval_shape(lambda: text.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))))
    s = vision.image_size
    v = nn.unbox(jax.eval_shape(lambda: vision.init(jax.random.key(0), jnp.zeros((1, s, s, 3)))))
    return _count(t), _count(v)


def test_param_counts_of_large_variants():
    karlo, paper = _counts("karlo"), _counts("paper")
    print("clip parameter counts (text, vision): karlo", karlo, "paper", paper)
    assert 1.2e8 < karlo[0] < 1.3e8 and 3.0e8 < karlo[1] < 3.1e8  # ViT-L/14: 123M text + 304M vision
    assert 3.3e8 < paper[0] < 3.6e8 and 6.2e8 < paper[1] < 6.5e8  # ViT-H/16: ~632M vision


@pytest.mark.torch
def test_karlo_counts_equal_transformers(torch_threads):
    torch = torch_threads
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from unclip_jax.convert.clip import text_config_from_module, vision_config_from_module

    with torch.device("meta"):
        t = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_from_module(clip.build_text("karlo"))))
        v = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_config_from_module(clip.build_vision("karlo"))))
    want = (sum(p.numel() for p in t.parameters()), sum(p.numel() for p in v.parameters()))
    assert _counts("karlo") == want


def test_conv_stem(tmp_path):
    """Xiao et al. 2021's stem: the patch convolution's token grid, its layers as written, native round trip."""
    from unclip_jax.convert.clip import vision_config_from_module
    from unclip_jax.convert.native import load_native, save_native

    kw = dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64, projection_dim=16)
    tower = clip.CLIPVisionModel(stem="conv", **kw)
    img = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32))
    variables = tower.init(jax.random.key(0), img)
    params = nn.unbox(variables)["params"]
    assert "patch_embedding" not in params
    kernels = [params["stem"][f"conv_{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
    assert params["stem"]["proj"]["kernel"].shape == (1, 1, 32, 32)
    out = tower.apply(variables, img)
    assert out["last_hidden_state"].shape == (2, 1 + 4 * 4, 32)

    # The stem written out: 3x3 stride-2 convolutions with 'same' padding, GroupNorm (8 groups, eps 1e-6), ReLU,
    # then the 1x1 projection.
    def reference(x, p):
        for i in range(3):
            k = p[f"conv_{i}"]["kernel"]
            x = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            b, h, w, c = x.shape
            g = np.asarray(x).reshape(b, h, w, 8, c // 8)
            g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
            x = np.maximum(g.reshape(b, h, w, c) * p[f"norm_{i}"]["scale"] + p[f"norm_{i}"]["bias"], 0)
        return np.einsum("bhwc,cd->bhwd", x, p["proj"]["kernel"][0, 0])

    got = clip.ConvStem(8, 32).apply({"params": params["stem"]}, img)
    np.testing.assert_allclose(np.asarray(got), reference(img, params["stem"]), atol=2e-5)

    folder = save_native(tower, variables, tmp_path / "conv_stem")
    module, loaded = load_native(folder)
    assert module.stem == "conv"
    np.testing.assert_array_equal(
        np.asarray(module.apply(loaded, img)["image_embeds"]), np.asarray(out["image_embeds"])
    )
    with pytest.raises(ValueError, match="stem='conv'.*native format"):
        vision_config_from_module(tower)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        clip.CLIPVisionModel(stem="conv", **{**kw, "image_size": 24, "patch_size": 6}).init(
            jax.random.key(0), jnp.zeros((1, 24, 24, 3))
        )
    with pytest.raises(ValueError, match="stem='resnet', expected 'patch' or 'conv'"):
        clip.CLIPVisionModel(stem="resnet", **kw).init(jax.random.key(0), img)
