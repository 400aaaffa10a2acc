"""Diffusion prior module: shapes, masks, normalisation, null inputs, bf16, parameter counts."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import clip, prior


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract(module):
    return nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), **prior.example_inputs(module))))


@pytest.fixture(scope="module")
def setup():
    module = prior.build("test")
    rng = np.random.default_rng(0)
    b, d, n = 3, module.embedding_dim, module.num_embeddings
    inputs = dict(
        hidden_states=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        timestep=jnp.asarray([0, 10, 999]),
        proj_embedding=jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32),
        attention_mask=jnp.asarray(np.arange(n)[None] < np.array([[5], [n], [2]])),
    )
    variables = jax.jit(module.init)(jax.random.key(0), **inputs)
    apply = jax.jit(lambda v, kw: module.apply(v, **kw))
    return module, variables, inputs, apply


def test_forward_shape_and_collections(setup):
    module, variables, inputs, apply = setup
    assert set(variables) == {"params", "stats"}
    out = apply(variables, inputs)
    assert out.shape == (3, module.embedding_dim) and bool(jnp.all(jnp.isfinite(out)))


def test_padded_caption_tokens_do_not_matter(setup):
    _, variables, inputs, apply = setup
    mask = inputs["attention_mask"]
    noisy = jnp.where(mask[..., None], inputs["encoder_hidden_states"], 50.0)
    out1 = apply(variables, inputs)
    out2 = apply(variables, {**inputs, "encoder_hidden_states": noisy})
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out2), atol=1e-5)
    # ...but real caption tokens do.
    out3 = apply(variables, {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"] + 1.0})
    assert not np.allclose(np.asarray(out1), np.asarray(out3), atol=1e-3)


def test_normalize_denormalize_inverse(setup):
    module, variables, inputs, _ = setup
    d = module.embedding_dim
    stats = {"clip_mean": jnp.linspace(-1, 1, d)[None], "clip_std": jnp.linspace(0.5, 2, d)[None]}
    v = {**variables, "stats": stats}
    z = inputs["hidden_states"]
    zn = module.apply(v, z, method="normalize")
    np.testing.assert_allclose(np.asarray(zn), np.asarray((z - stats["clip_mean"]) / stats["clip_std"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(module.apply(v, zn, method="denormalize")), np.asarray(z), atol=1e-5)


def test_learned_null_text_replaces_caption(setup):
    _, _, inputs, _ = setup
    module = prior.build("test", learned_null_text=True)
    variables = jax.jit(module.init)(jax.random.key(0), **inputs)
    assert "null_text_embedding" in variables["params"]
    drop = jnp.array([True, True, False])
    fwd = jax.jit(lambda v, kw, drop: module.apply(v, **kw, drop_text=drop))
    out = fwd(variables, inputs, drop)
    other = {
        **inputs,
        "proj_embedding": inputs["proj_embedding"] * 3,
        "encoder_hidden_states": -inputs["encoder_hidden_states"],
    }
    out2 = fwd(variables, other, drop)
    np.testing.assert_allclose(np.asarray(out[:2]), np.asarray(out2[:2]), atol=1e-5)
    assert not np.allclose(np.asarray(out[2]), np.asarray(out2[2]), atol=1e-3)
    with pytest.raises(ValueError, match="empty caption"):
        prior.build("test").apply(setup[1], **inputs, drop_text=drop)


def test_bf16_compute_runs(setup):
    module, variables, inputs, apply = setup
    m16 = prior.build("test", dtype=jnp.bfloat16)
    out16 = jax.jit(lambda v, kw: m16.apply(v, **kw))(variables, inputs)
    out32 = apply(variables, inputs)
    assert out16.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32))) < 0.1 * float(jnp.max(jnp.abs(out32))) + 0.05


def test_wrong_caption_length_is_an_error(setup):
    module, variables, inputs, _ = setup
    with pytest.raises(ValueError, match="num_embeddings"):
        module.apply(variables, **{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :5]})


def test_param_counts_of_large_variants():
    counts = {name: _count(_abstract(prior.build(name))) for name in ("bench", "karlo", "paper")}
    print("prior parameter counts:", counts)
    assert 0.95e9 < counts["karlo"] < 1.1e9  # "Karlo prior 1B"
    assert 1.1e9 < counts["paper"] < 1.4e9  # width 2048 x 24 blocks ("1B" in table 3)
    assert counts["bench"] < counts["karlo"]
    # Each large prior reads the caption states of the CLIP text tower it is paired with (the cascade's input).
    for name in ("karlo", "paper"):
        assert prior.VARIANTS[name]["num_embeddings"] == clip.VARIANTS[name]["text"]["context_length"]


@pytest.mark.torch
def test_karlo_count_equals_diffusers(torch_threads):
    torch = torch_threads
    from diffusers import PriorTransformer

    with torch.device("meta"):
        ref = PriorTransformer(**prior.VARIANTS["karlo"])
    want = sum(p.numel() for p in ref.parameters())
    assert _count(_abstract(prior.build("karlo"))) == want
