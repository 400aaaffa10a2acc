"""The unCLIP decoder (models/decoder.py): parity with diffusers UNet2DConditionModel + UnCLIPTextProjModel,
classifier-free-guidance dropouts, bf16, and parameter counts of the big variants."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import decoder as cd
from unclip_jax.layers import unet_blocks
from unclip_jax.models import decoder, unet


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _inputs(m: decoder.UnCLIPDecoder, b: int, size: tuple[int, int], length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = m.clip_embeddings_dim
    mask = np.ones((b, length), bool)
    mask[0, length // 2 :] = False
    return dict(
        x_t=rng.standard_normal((b, *size, m.in_channels)).astype(np.float32),
        t=rng.integers(0, 1000, b).astype(np.int32),
        image_embeds=rng.standard_normal((b, d)).astype(np.float32),
        text_embeds=rng.standard_normal((b, d)).astype(np.float32),
        text_hidden_states=rng.standard_normal((b, length, d)).astype(np.float32),
        text_mask=mask,
    )


def random_params(module, *args, seed: int = 1, **kwargs):
    """Random values for every parameter (from ``jax.eval_shape``: no init compile); norms' scales near 1."""
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for path, leaf in flat[0]:
        v = 0.05 * rng.standard_normal(leaf.shape).astype(np.float32)
        values.append(jnp.asarray(v + (1.0 if str(path[-1].key) == "scale" else 0.0)))
    return jax.tree.unflatten(flat[1], values)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def test_decoder_is_the_unet_with_attention_fields():
    # Native folders record the class path and these constructor fields in config.json.
    assert issubclass(decoder.Decoder, unet.UNetModel) and not issubclass(decoder.UnCLIPDecoder, decoder.Decoder)
    assert decoder.Decoder.__module__ == decoder.UnCLIPDecoder.__module__ == "unclip_jax.models.decoder"
    attention = {"attention_resolutions", "num_head_channels", "context_dim"}
    assert _fields(decoder.Decoder) == _fields(unet.UNetFields) | attention
    assert _fields(decoder.UnCLIPDecoder) == _fields(decoder.Decoder) | {
        "clip_embeddings_dim",
        "clip_extra_context_tokens",
        # GLIDE's caption transformer (text_encoder="glide"; tests/models/test_glide_text.py)
        "text_encoder",
        "text_ctx",
        "xf_width",
        "xf_layers",
        "xf_heads",
        "xf_final_ln",
        "xf_padding",
        "xf_vocab_size",
    }
    assert len(_fields(decoder.Decoder)) == 19
    m = decoder.build("tiny", remat=True)
    inner = decoder.Decoder(**m.unet_kwargs())
    assert inner == decoder.Decoder(**{k: getattr(m, k) for k in _fields(decoder.Decoder)})
    assert inner.attention_head_dim == 32 and [inner.level_attends(i) for i in range(3)] == [False, True, True]
    assert m.text_proj_kwargs()["time_embed_dim"] == inner.temb_dim == 64


@pytest.fixture(scope="module")
def test_model():
    """The 'test' variant with random params and one compiled apply taking every optional input."""
    m = decoder.build("test")
    inp = _inputs(m, 2, (16, 16), 5)
    params = random_params(m, **inp)

    @jax.jit
    def run(params, inp, drop_image_embeds, drop_caption, null_caption):
        return m.apply(
            params, **inp, drop_image_embeds=drop_image_embeds, drop_caption=drop_caption, null_caption=null_caption
        )

    return m, params, inp, run


def test_shapes_and_guidance_dropouts(test_model):
    m, params, inp, run = test_model
    d = m.clip_embeddings_dim
    no = jnp.array([False, False])
    null = (jnp.full((1, d), 0.5), jnp.full((1, 5, d), -0.25), jnp.array([[True, False, False, False, False]]))
    out = run(params, inp, no, no, null)
    assert out.shape == (2, 16, 16, 6) and bool(jnp.isfinite(out).all())
    # Dropping z_i == feeding the learned classifier-free-guidance embedding as z_i.
    cf = params["params"]["text_proj"]["learned_classifier_free_guidance_embeddings"]
    dropped = run(params, inp, jnp.array([True, False]), no, null)
    fed = run(params, {**inp, "image_embeds": jnp.stack([cf, inp["image_embeds"][1]])}, no, no, null)
    np.testing.assert_allclose(dropped, fed, atol=1e-6)
    assert float(jnp.abs(dropped[0] - out[0]).max()) > 1e-3
    np.testing.assert_allclose(dropped[1], out[1], atol=1e-6)
    # Dropping the caption == calling with the null caption.
    dropped = run(params, inp, no, jnp.array([False, True]), null)
    swapped = dict(inp)
    for key, value in zip(("text_embeds", "text_hidden_states", "text_mask"), null):
        swapped[key] = np.stack([inp[key][0], np.asarray(value[0])])
    direct = run(params, swapped, no, no, null)
    np.testing.assert_allclose(dropped, direct, atol=1e-6)
    assert float(jnp.abs(dropped[1] - out[1]).max()) > 1e-3
    with pytest.raises(ValueError, match="null_caption"):
        jax.eval_shape(lambda: m.apply(params, **inp, drop_caption=no))
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(lambda: m.apply(params, **{**inp, "x_t": inp["x_t"][:, :7]}))


def test_bf16_runs(test_model):
    m, params, inp, run = test_model
    no = jnp.array([False, False])
    d = m.clip_embeddings_dim
    null = (jnp.zeros((1, d)), jnp.zeros((1, 5, d)), jnp.ones((1, 5), bool))
    out32 = run(params, inp, no, no, null)
    out16 = jax.jit(decoder.build("test", dtype=jnp.bfloat16).apply)(params, **inp)
    assert out16.dtype == jnp.bfloat16 and out16.shape == out32.shape
    err = float(jnp.abs(out16.astype(jnp.float32) - out32).max())
    assert err < 0.05 * float(jnp.abs(out32).max()), err


# Two parity configurations derived from the 'test' variant: they vary block channels, blocks per level,
# which levels attend, head dim, time conditioning, context length, image size and batch.
PARITY = {
    "A": (
        dict(
            channel_mult=(1, 2, 3),
            attention_resolutions=(2, 4),
            context_dim=48,
            clip_embeddings_dim=24,
        ),
        dict(b=2, size=(16, 16), length=5),
    ),
    "B": (
        dict(
            model_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(1, 2),
            num_head_channels=8,
            use_scale_shift_norm=False,
            context_dim=32,
            clip_embeddings_dim=16,
            norm_num_groups=4,
        ),
        dict(b=3, size=(8, 12), length=3),
    ),
}


def _torch_reference(torch, m: decoder.UnCLIPDecoder, folder):
    """Random diffusers decoder + text_proj with the config our exporter writes for ``m``, saved to ``folder``."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    unet = UNet2DConditionModel.from_config(cd.decoder_config(decoder.Decoder(**m.unet_kwargs())))
    proj = UnCLIPTextProjModel.from_config(cd.text_proj_config(decoder.UnCLIPTextProj(**m.text_proj_kwargs())))
    with torch.no_grad():
        for p in [*unet.parameters(), *proj.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    unet.eval().save_pretrained(folder / "decoder")
    proj.eval().save_pretrained(folder / "text_proj")
    return unet, proj


def torch_forward(torch, unet, proj, inp, cfg_guidance=False):
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inp.items()}
    with torch.no_grad():
        ctx, add = proj(
            image_embeddings=t["image_embeds"],
            prompt_embeds=t["text_embeds"],
            text_encoder_hidden_states=t["text_hidden_states"],
            do_classifier_free_guidance=cfg_guidance,
        )
        mask = torch.nn.functional.pad(t["text_mask"], (proj.clip_extra_context_tokens, 0), value=True)
        x = t["x_t"].permute(0, 3, 1, 2)
        out = unet(x, t["t"], encoder_hidden_states=ctx, class_labels=add, attention_mask=mask).sample
    return out.permute(0, 2, 3, 1).numpy(), ctx.numpy(), add.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(PARITY))
def test_matches_diffusers(torch_threads, tmp_path, monkeypatch, name):
    """Through the blockwise attention core (BLOCK_Q = 8 puts these small images' attention above one block)."""
    monkeypatch.setattr(unet_blocks, "BLOCK_Q", 8)
    torch = torch_threads
    overrides, shape = PARITY[name]
    m = decoder.build("test", **overrides)
    unet, proj = _torch_reference(torch, m, tmp_path)
    module, variables = cd.load_unclip_decoder(tmp_path)
    assert module == m
    inp = _inputs(m, shape["b"], shape["size"], shape["length"], seed=5)
    want, _, _ = torch_forward(torch, unet, proj, inp)
    got = np.asarray(jax.jit(module.apply)(variables, **inp))
    diff = float(np.abs(got - want).max())
    print(f"decoder parity {name}: max abs diff {diff:.2e} (output max {np.abs(want).max():.2f})")
    assert diff <= 1e-4, diff
    if name == "A":
        # diffusers' sampling-time CFG path: the learned embedding is prepended for the unconditional half.
        half = {k: v[:1] for k, v in inp.items() if k == "image_embeds"}
        tp = decoder.UnCLIPTextProj(**m.text_proj_kwargs())
        ctx, add = tp.apply(
            {"params": variables["params"]["text_proj"]},
            half["image_embeds"],
            inp["text_embeds"],
            inp["text_hidden_states"],
            do_classifier_free_guidance=True,
        )
        _, want_ctx, want_add = torch_forward(torch, unet, proj, {**inp, **half}, cfg_guidance=True)
        assert max(np.abs(ctx - want_ctx).max(), np.abs(add - want_add).max()) <= 1e-5


@pytest.mark.torch
def test_parameter_counts(torch_threads):
    torch = torch_threads
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    counts = {}
    for variant in ("karlo", "paper"):
        m = decoder.build(variant)
        d = m.clip_embeddings_dim
        shapes = jax.eval_shape(
            lambda m=m, d=d: m.init(
                jax.random.key(0),
                jnp.zeros((1, 64, 64, 3)),
                jnp.zeros((1,)),
                jnp.zeros((1, d)),
                jnp.zeros((1, d)),
                jnp.zeros((1, 77, d)),
            )
        )
        counts[variant] = _count(nn.unbox(shapes)["params"])
        print(f"decoder {variant}: {counts[variant] / 1e6:.1f}M parameters (U-Net + text projection)")
    # Karlo: the same config in diffusers (meta device: no memory) has the same number of parameters.
    karlo = decoder.build("karlo")
    cfg = cd.decoder_config(decoder.Decoder(**karlo.unet_kwargs()))
    assert cfg["block_out_channels"] == [320, 640, 960, 1280] and cfg["layers_per_block"] == 3
    assert cfg["down_block_types"] == ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3
    assert cfg["up_block_types"] == ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]
    assert (cfg["cross_attention_dim"], cfg["attention_head_dim"]) == (1536, 64)
    with torch.device("meta"):
        ref = sum(p.numel() for p in UNet2DConditionModel.from_config(cfg).parameters())
        ref += sum(
            p.numel()
            for p in UnCLIPTextProjModel.from_config(
                cd.text_proj_config(decoder.UnCLIPTextProj(**karlo.text_proj_kwargs()))
            ).parameters()
        )
    assert counts["karlo"] == ref
    assert 0.85e9 < counts["karlo"] < 0.95e9  # "decoder 900M" (Karlo model card)
    # Paper: the U-Net (+ CLIP projections) of GLIDE's 3.5B model; its 24x2048 caption transformer (~1.2B) is
    # the rest of the 3.5B.
    assert 2.0e9 < counts["paper"] < 2.5e9
