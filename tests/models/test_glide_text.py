"""GLIDE's caption transformer in the decoder (models/glide_text.py; issue 21): shapes, the paper variant's parameter
count against the paper's 3.5B, parity with glide-text2im's ``xf.py`` / ``get_text_emb`` maths (transcribed in torch),
the learned padding and the empty caption, classifier-free guidance with the empty caption, fsdp sharding."""

from __future__ import annotations

import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import parallel
from unclip_jax.diffusion import classifier_free_guidance
from unclip_jax.models import decoder, glide_text
from unclip_jax.pipeline.program import decoder_conditions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_PARAMS = 3.5e9  # appendix C table 3, "64 decoder"
TOLERANCE = 0.05  # the paper rounds to 0.1B; our count uses CLIP's 49408-token vocabulary (GLIDE's BPE: 50257)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _experiment(arg: str):
    spec = importlib.util.spec_from_file_location("_exp_decoder_glide", os.path.join(ROOT, "experiments/decoder.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _decoder_of(arg: str) -> decoder.UnCLIPDecoder:
    c = _experiment(arg)
    return decoder.build(c.model.variant, **dict(c.model.overrides))


def _init_args(m: decoder.UnCLIPDecoder, b: int = 1, length: int | None = None):
    s, length = m.sample_size, length or m.text_ctx
    return (jnp.zeros((b, s, s, 3)), jnp.zeros((b,)), jnp.zeros((b, m.clip_embeddings_dim))), dict(
        input_ids=jnp.zeros((b, length), jnp.int32)
    )


def _abstract_params(m):
    args, kw = _init_args(m)
    return nn.unbox(jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kw)))["params"]


def _random(tree, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32) for x in leaves])


def test_test_variant_shapes_and_closed_form_count():
    m = _decoder_of("test_glide")
    assert m.glide and (m.text_ctx, m.xf_width, m.xf_layers, m.xf_heads) == (77, 32, 2, 2)
    params = _abstract_params(m)
    assert set(params) == {"text_encoder", "text_proj", "unet"}
    # z_t and the CLIP caption projections are gone; the 4 z_i tokens and the z_i time projection stay.
    assert set(params["text_proj"]) == {
        "learned_classifier_free_guidance_embeddings",
        "clip_image_embeddings_project_to_time_embeddings",
        "clip_extra_context_tokens_proj",
    }
    enc = glide_text.GlideTextEncoder(**m.text_encoder_kwargs())
    assert _count(params["text_encoder"]) == glide_text.num_params(enc)
    p = params["text_encoder"]
    assert p["token_embedding"]["embedding"].shape == (glide_text.CLIP_VOCAB_SIZE, 32)
    assert p["positional_embedding"].shape == p["padding_embedding"].shape == (77, 32)
    assert p["transformer_proj"]["kernel"].shape == (32, m.temb_dim)
    # The attention layers read the token states through their own projections (GLIDE encoder_kv).
    assert params["unet"]["mid_block"]["attentions_0"]["add_k_proj"]["kernel"].shape[0] == m.xf_width
    xf_proj, xf_out = enc.apply({"params": _random(p)}, jnp.ones((3, 10), jnp.int32), jnp.ones((3, 10), bool))
    assert xf_proj.shape == (3, m.temb_dim) and xf_out.shape == (3, 10, 32)
    with pytest.raises(ValueError, match="exceed text_ctx=77"):
        enc.apply({"params": _random(p)}, jnp.ones((1, 78), jnp.int32))


def test_paper_variant_is_the_papers_3_5b_decoder():
    m = _decoder_of("paper")
    # Table 3: text encoder ctx 256 / width 2048 / 24 blocks / 32 heads; the U-Net of appendix C.
    assert (m.text_encoder, m.text_ctx, m.xf_width, m.xf_layers, m.xf_heads) == ("glide", 256, 2048, 24, 32)
    assert (m.model_channels, m.num_res_blocks, m.context_dim) == (512, 3, 2048)
    params = _abstract_params(m)
    counts = {k: _count(v) for k, v in params.items()}
    total = sum(counts.values())
    print(f"paper decoder: {total / 1e9:.3f}B = { ({k: round(v / 1e6, 1) for k, v in counts.items()}) } (M)")
    assert counts["text_encoder"] == glide_text.num_params(glide_text.GlideTextEncoder(**m.text_encoder_kwargs()))
    assert abs(total - PAPER_PARAMS) <= TOLERANCE * PAPER_PARAMS, total
    # Without the transformer (Karlo's CLIP-caption pathway) the same U-Net is ~1.3B short of the paper.
    assert abs(counts["unet"] + counts["text_proj"] - PAPER_PARAMS) > 0.3 * PAPER_PARAMS


def _glide_text_torch(torch, p_all, ids, mask, w, heads, layers, final_ln, padding):
    """glide-text2im's ``Text2ImUNet.get_text_emb`` and ``xf.py`` (Transformer, ResidualAttentionBlock,
    MultiheadAttention with a fused c_qkv split per head, QKVMultiheadAttention, MLP with nn.GELU, fp32 LayerNorm),
    transcribed with the parameters passed in as a dict of tensors."""
    F = torch.nn.functional

    def ln(x, p):
        return F.layer_norm(x.float(), (w,), p["w"], p["b"], 1e-5)

    def lin(x, p):
        return F.linear(x, p["w"], p["b"])

    def attention(x, p):
        qkv = lin(x, p["c_qkv"])
        bs, n_ctx, width = qkv.shape
        attn_ch = width // heads // 3
        scale = 1 / math.sqrt(math.sqrt(attn_ch))
        qkv = qkv.view(bs, n_ctx, heads, -1)
        q, k, v = torch.split(qkv, attn_ch, dim=-1)
        weight = torch.einsum("bthc,bshc->bhts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1)
        out = torch.einsum("bhts,bshc->bthc", weight, v).reshape(bs, n_ctx, -1)
        return lin(out, p["c_proj"])

    def mlp(x, p):
        return lin(F.gelu(lin(x, p["c_fc"])), p["c_proj"])

    xf_in = p_all["token_embedding"][ids] + p_all["positional_embedding"][None, : ids.shape[1]]
    if padding:
        xf_in = torch.where(mask[..., None], xf_in, p_all["padding_embedding"][None, : ids.shape[1]])
    x = xf_in
    for i in range(layers):
        b = p_all["blocks"][i]
        x = x + attention(ln(x, b["ln_1"]), b["attn"])
        x = x + mlp(ln(x, b["ln_2"]), b["mlp"])
    if final_ln:
        x = ln(x, p_all["final_ln"])
    return lin(x[:, -1], p_all["transformer_proj"]), x


@pytest.mark.torch
def test_matches_glide_text2im_transformer_maths(torch_threads):
    """Our q/k/v kernels, split per head from GLIDE's fused c_qkv ([q_h, k_h, v_h] per head h), give GLIDE's output."""
    torch = torch_threads
    w, heads, layers, temb, ctx = 32, 4, 2, 48, 12
    enc = glide_text.GlideTextEncoder(
        text_ctx=ctx, xf_width=w, xf_layers=layers, xf_heads=heads, vocab_size=50, time_embed_dim=temb
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (2, 10)).astype(np.int32)
    mask = np.ones((2, 10), bool)
    mask[0, 4:] = False
    shapes = nn.unbox(jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask))))
    params = jax.tree.map(np.asarray, _random(shapes["params"], seed=3, scale=0.3))
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    hc = w // heads
    p_all = dict(
        token_embedding=t(params["token_embedding"]["embedding"]),
        positional_embedding=t(params["positional_embedding"]),
        padding_embedding=t(params["padding_embedding"]),
        final_ln=dict(w=t(params["final_ln"]["scale"]), b=t(params["final_ln"]["bias"])),
        transformer_proj=dict(w=t(params["transformer_proj"]["kernel"].T), b=t(params["transformer_proj"]["bias"])),
        blocks=[],
    )
    for i in range(layers):
        b = params["transformer"][f"layers_{i}"]
        a = b["attn"]
        # c_qkv output row (h, j) with j in [0, 3 hc): q for j < hc, k for hc <= j < 2 hc, v after (xf.py's split).
        kq, kk, kv = (a[n]["kernel"].reshape(w, heads, hc) for n in ("query", "key", "value"))
        bq, bk, bv = (a[n]["bias"].reshape(heads, hc) for n in ("query", "key", "value"))
        c_qkv_w = np.concatenate([kq, kk, kv], axis=-1).reshape(w, 3 * w).T
        c_qkv_b = np.concatenate([bq, bk, bv], axis=-1).reshape(3 * w)
        p_all["blocks"].append(
            dict(
                ln_1=dict(w=t(b["norm1"]["scale"]), b=t(b["norm1"]["bias"])),
                ln_2=dict(w=t(b["norm2"]["scale"]), b=t(b["norm2"]["bias"])),
                attn=dict(
                    c_qkv=dict(w=t(c_qkv_w), b=t(c_qkv_b)),
                    c_proj=dict(w=t(a["out"]["kernel"].T), b=t(a["out"]["bias"])),
                ),
                mlp=dict(
                    c_fc=dict(w=t(b["mlp"]["fc1"]["kernel"].T), b=t(b["mlp"]["fc1"]["bias"])),
                    c_proj=dict(w=t(b["mlp"]["fc2"]["kernel"].T), b=t(b["mlp"]["fc2"]["bias"])),
                ),
            )
        )
    want_proj, want_out = _glide_text_torch(
        torch, p_all, torch.tensor(ids).long(), torch.tensor(mask), w, heads, layers, True, True
    )
    got_proj, got_out = enc.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(got_out) - want_out.numpy()).max() < 1e-5
    assert np.abs(np.asarray(got_proj) - want_proj.numpy()).max() < 1e-5


@pytest.fixture(scope="module")
def glide_test_decoder():
    m = _decoder_of("test_glide")
    return m, {"params": _random(_abstract_params(m), seed=1, scale=0.1)}


def test_padding_embedding_and_empty_caption(glide_test_decoder):
    m, variables = glide_test_decoder
    enc = glide_text.GlideTextEncoder(**m.text_encoder_kwargs())
    v = {"params": variables["params"]["text_encoder"]}
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 1000, (2, 77)), jnp.int32)
    mask = jnp.arange(77)[None].repeat(2, 0) < jnp.asarray([[5], [9]])
    a = enc.apply(v, ids, mask)
    # Ids at padded positions do not matter (their input is the learned padding embedding) ...
    b = enc.apply(v, jnp.where(mask, ids, 7), mask)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    # ... and the empty caption is padding everywhere: one output whatever the ids.
    e_ids, e_mask = glide_text.empty_caption(2, 77)
    assert not e_mask.any() and not e_ids.any()
    e1, e2 = enc.apply(v, e_ids, e_mask), enc.apply(v, ids, e_mask)
    np.testing.assert_array_equal(np.asarray(e1[0]), np.asarray(e2[0]))
    # The decoder's caption dropout gives the empty caption.
    s = m.sample_size
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, s, s, 3)), jnp.float32)
    t, z = jnp.asarray([10, 500]), jnp.asarray(rng.standard_normal((2, m.clip_embeddings_dim)), jnp.float32)
    dropped = m.apply(variables, x, t, z, input_ids=ids, text_mask=mask, drop_caption=jnp.asarray([True, False]))
    empty = m.apply(variables, x, t, z, input_ids=e_ids, text_mask=e_mask)
    full = m.apply(variables, x, t, z, input_ids=ids, text_mask=mask)
    np.testing.assert_allclose(np.asarray(dropped[0]), np.asarray(empty[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(dropped[1]), np.asarray(full[1]), atol=1e-6)
    assert np.abs(np.asarray(empty[1] - full[1])).max() > 1e-4  # the caption matters


def test_guidance_with_the_empty_caption_is_the_cfg_formula(glide_test_decoder):
    """The pipeline's unconditional branch is the empty caption + the learned z_i embedding; the guided eps is
    ``uncond + s (cond - uncond)`` and the variance channels come from the conditional branch."""
    m, variables = glide_test_decoder
    rng = np.random.default_rng(2)
    b, s = 2, m.sample_size
    ids = jnp.asarray(rng.integers(1, 1000, (b, 77)), jnp.int32)
    mask = jnp.arange(77)[None].repeat(b, 0) < 6
    text = dict(input_ids=ids, mask=mask)
    z = jnp.asarray(rng.standard_normal((b, m.clip_embeddings_dim)), jnp.float32)
    cond, uncond = decoder_conditions(m, text, {}, z, False)
    e_ids, e_mask = glide_text.empty_caption(b, 77)
    np.testing.assert_array_equal(np.asarray(uncond["input_ids"]), np.asarray(e_ids))
    np.testing.assert_array_equal(np.asarray(uncond["text_mask"]), np.asarray(e_mask))
    denoise = lambda x, t, **kw: m.apply(variables, x, t, **kw)  # noqa: E731
    x = jnp.asarray(rng.standard_normal((b, s, s, 3)), jnp.float32)
    t = jnp.asarray([100, 700])
    scale = 3.0
    guided = classifier_free_guidance(denoise, scale, cond, uncond, guided_channels=m.image_channels)(x, t)
    out_c = m.apply(variables, x, t, z, input_ids=ids, text_mask=mask, drop_image_embeds=jnp.zeros(b, bool))
    out_u = m.apply(variables, x, t, z, input_ids=e_ids, text_mask=e_mask, drop_image_embeds=jnp.ones(b, bool))
    want = np.concatenate([out_u[..., :3] + scale * (out_c[..., :3] - out_u[..., :3]), out_c[..., 3:]], -1)
    np.testing.assert_allclose(np.asarray(guided), want, atol=1e-5)


def test_transformer_params_are_sharded_under_fsdp():
    """fsdp over the 8 fake CPU devices: the transformer's kernels and embeddings are split along their width."""
    m = _decoder_of("test_glide")
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rules = parallel.logical_rules({"rules": "fsdp"})
    args, kw = _init_args(m, b=8)
    _, shardings = parallel.abstract_init(lambda: m.init(jax.random.key(0), *args, **kw), mesh=mesh, rules=rules)
    enc = shardings["params"]["text_encoder"]
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(enc)[0]
    }
    for name in (
        "token_embedding/embedding",
        "positional_embedding",
        "padding_embedding",
        "transformer/layers_0/attn/query/kernel",
        "transformer/layers_1/mlp/fc1/kernel",
        "transformer/layers_1/mlp/fc2/kernel",
        "transformer_proj/kernel",
    ):
        assert "fsdp" in jax.tree.leaves(tuple(flat[name])), (name, flat[name])
    assert all(s == jax.sharding.PartitionSpec() for n, s in flat.items() if "norm" in n or n.startswith("final_ln"))
