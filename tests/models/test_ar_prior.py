"""Autoregressive prior module: sequence layout, causality, null text, KV-cached sampler, sampling filters."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.layers import axes
from unclip_jax.models import ar_prior, clip, pca_codec

B = 3


@pytest.fixture(scope="module")
def setup():
    module = ar_prior.build("test")
    rng = np.random.default_rng(0)
    d, n_txt, dt, k = module.embedding_dim, module.num_text_tokens, module.hidden_dim, module.num_components
    z = rng.normal(size=(256, d))
    codec = pca_codec.fit(z, k, module.num_buckets, text_embeds=z + rng.normal(size=z.shape), num_dot_buckets=8)
    variables = dict(jax.jit(module.init)(jax.random.key(0), **ar_prior.example_inputs(module, B)))
    variables["stats"] = ar_prior.codec_variables(codec)
    cond = dict(
        text_hidden_states=jnp.asarray(rng.normal(size=(B, n_txt, dt)), jnp.float32),
        text_mask=jnp.asarray(np.arange(n_txt)[None] < np.array([[5], [n_txt], [2]])),
        text_embeds=jnp.asarray(rng.normal(size=(B, d)), jnp.float32),
    )
    tokens = dict(
        dot_tokens=jnp.asarray(rng.integers(0, module.num_dot_buckets, B), jnp.int32),
        codes=jnp.asarray(rng.integers(0, module.num_buckets, (B, k)), jnp.int32),
    )
    apply = jax.jit(lambda v, c, t, drop=None: module.apply(v, **c, **t, drop_text=drop))
    return module, variables, cond, tokens, apply


def test_collections_shapes_and_logical_axes(setup):
    module, variables, cond, tokens, apply = setup
    assert set(variables) == {"params", "stats"}
    dot_logits, code_logits = apply(variables, cond, tokens)
    assert dot_logits.shape == (B, module.num_dot_buckets)
    assert code_logits.shape == (B, module.num_components, module.num_buckets)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **ar_prior.example_inputs(module)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert all(name is None or name in axes.ALL for name in leaf.names), leaf.names


def test_causal_over_codes(setup):
    module, variables, cond, tokens, apply = setup
    _, base = apply(variables, cond, tokens)
    j = 3
    changed = dict(tokens, codes=tokens["codes"].at[:, j].set((tokens["codes"][:, j] + 1) % module.num_buckets))
    _, out = apply(variables, cond, changed)
    # Code j is the input of the position predicting code j+1: logits of codes 0..j are untouched.
    np.testing.assert_allclose(np.asarray(out[:, : j + 1]), np.asarray(base[:, : j + 1]), atol=1e-6)
    assert not np.allclose(np.asarray(out[:, j + 1 :]), np.asarray(base[:, j + 1 :]), atol=1e-4)
    # The dot token conditions every code.
    moved = dict(tokens, dot_tokens=(tokens["dot_tokens"] + 1) % module.num_dot_buckets)
    dot2, out2 = apply(variables, cond, moved)
    np.testing.assert_allclose(np.asarray(dot2), np.asarray(apply(variables, cond, tokens)[0]), atol=1e-6)
    assert not np.allclose(np.asarray(out2), np.asarray(base), atol=1e-4)


def test_padding_and_null_text(setup):
    module, variables, cond, tokens, apply = setup
    mask = cond["text_mask"]
    noisy = dict(cond, text_hidden_states=jnp.where(mask[..., None], cond["text_hidden_states"], 50.0))
    base = apply(variables, cond, tokens)
    np.testing.assert_allclose(np.asarray(apply(variables, noisy, tokens)[1]), np.asarray(base[1]), atol=1e-5)
    # Dropped rows ignore the caption and z_t entirely; kept rows are the conditional output.
    drop = jnp.asarray([True, False, True])
    other = dict(
        cond, text_hidden_states=cond["text_hidden_states"] + 1.0, text_embeds=-cond["text_embeds"], text_mask=None
    )
    a = apply(variables, cond, tokens, drop)[1]
    b = apply(variables, other, tokens, drop)[1]
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(base[1][1]), atol=1e-6)
    assert not np.allclose(np.asarray(a[0]), np.asarray(base[1][0]), atol=1e-4)


def test_cached_steps_match_the_full_pass(setup):
    """Feeding the teacher-forced sequence one position at a time through the KV cache gives the full-pass logits."""
    module, variables, cond, tokens, _ = setup
    params = {"params": variables["params"]}
    dec = module.clone(decode=True)
    length, n = module.num_text_tokens, module.seq_len

    @jax.jit
    def run(params):
        pre, key_mask = module.apply(params, **cond, method=ar_prior.ARPrior.prefix)
        emb = module.apply(params, tokens["dot_tokens"], tokens["codes"][:, :-1], method=ar_prior.ARPrior.token_inputs)
        x = jnp.concatenate([pre, emb], axis=1)
        full = module.apply(params, x, key_mask, method=ar_prior.ARPrior.encode_sequence)
        full_logits = module.apply(params, full, method=ar_prior.ARPrior.heads)
        cache = dec.apply(params, x, key_mask, method=ar_prior.ARPrior.encode_sequence, mutable=["cache"])[1]["cache"]
        cache = jax.tree.map(jnp.zeros_like, cache)

        def body(cache, t):
            xt = jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
            out, upd = dec.apply(
                {**params, "cache": cache}, xt, t, key_mask, method=ar_prior.ARPrior.step, mutable=["cache"]
            )
            return upd["cache"], out

        _, (dot_steps, code_steps) = jax.lax.scan(body, cache, jnp.arange(n))
        return full_logits, (dot_steps.swapaxes(0, 1), code_steps.swapaxes(0, 1))

    (dot_full, code_full), (dot_step, code_step) = run(params)
    np.testing.assert_allclose(np.asarray(dot_step[:, length:]), np.asarray(dot_full[:, length:]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(code_step[:, length:]), np.asarray(code_full[:, length:]), atol=2e-5)


def test_cached_sampler_matches_full_reruns(setup):
    """Same key: the compiled KV-cached scan draws exactly the tokens of re-running the whole sequence per step."""
    module, variables, cond, _, _ = setup
    kw = dict(guidance_scale=3.0, temperature=0.9, top_k=12, top_p=0.95)

    @jax.jit
    def both(variables, rng):
        cached = ar_prior.sample(module, variables, **cond, rng=rng, use_cache=True, **kw)
        full = ar_prior.sample(module, variables, **cond, rng=rng, use_cache=False, **kw)
        return cached, full

    cached, full = both(variables, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(cached["codes"]), np.asarray(full["codes"]))
    np.testing.assert_array_equal(np.asarray(cached["dot_tokens"]), np.asarray(full["dot_tokens"]))
    codes = np.asarray(cached["codes"])
    assert codes.shape == (B, module.num_components) and len(np.unique(codes)) > 3  # not a constant
    # The embedding is the codec's decoding of the codes.
    state = {k: np.asarray(v, np.float64) for k, v in variables["stats"].items()}
    np.testing.assert_allclose(np.asarray(cached["image_embeds"]), pca_codec.decode(state, codes), atol=1e-4)


def test_guide_is_cfg_on_log_probabilities():
    """_guide: u + s (c - u) of the log-softmaxed (cond; uncond) halves; None leaves the logits alone."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2 * B, 11)) * 3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    c, u = logp[:B], logp[B:]
    for s in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(np.asarray(ar_prior._guide(jnp.asarray(logits), B, s)), u + s * (c - u), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ar_prior._guide(jnp.asarray(logits), B, None)), logits.astype(np.float32))
    # s = 1 is the conditional distribution, s = 0 the unconditional one.
    probs = lambda x: np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))
    np.testing.assert_allclose(probs(ar_prior._guide(jnp.asarray(logits), B, 1.0)), probs(logits[:B]), atol=1e-6)
    np.testing.assert_allclose(probs(ar_prior._guide(jnp.asarray(logits), B, 0.0)), probs(logits[B:]), atol=1e-6)


def test_guidance_scale_1_samples_the_conditional_model(setup):
    """Same key: guidance_scale=1 (a [2B] cond/uncond batch) draws exactly the tokens of the unguided sampler; 3 not."""
    module, variables, cond, _, _ = setup
    kw = dict(temperature=0.9, top_k=12, top_p=0.95)

    @jax.jit
    def three(variables, rng):
        run = lambda s: ar_prior.sample(module, variables, **cond, rng=rng, guidance_scale=s, **kw)
        return run(None), run(1.0), run(3.0)

    plain, one, strong = three(variables, jax.random.key(11))
    np.testing.assert_array_equal(np.asarray(one["codes"]), np.asarray(plain["codes"]))
    np.testing.assert_array_equal(np.asarray(one["dot_tokens"]), np.asarray(plain["dot_tokens"]))
    assert not np.array_equal(np.asarray(strong["codes"]), np.asarray(plain["codes"]))


def test_top_half_closed_form():
    p = jnp.asarray([0.1, 0.2, 0.3, 0.25, 0.15])  # cdf 0.1 0.3 0.6 ...: the median bucket is 2
    out = ar_prior.top_half(jnp.log(p))
    probs = np.asarray(jax.nn.softmax(out))
    np.testing.assert_allclose(probs, [0, 0, 0.3 / 0.7, 0.25 / 0.7, 0.15 / 0.7], atol=1e-6)
    # Sampling never draws below the median.
    draws = jax.random.categorical(jax.random.key(0), jnp.broadcast_to(out, (2000, 5)))
    assert int(draws.min()) == 2


def test_filter_logits_closed_form():
    logits = jnp.log(jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.15]))
    kept = lambda x: np.isfinite(np.asarray(x)).nonzero()[0].tolist()
    assert kept(ar_prior.filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(ar_prior.filter_logits(logits, top_p=0.7)) == [1, 3]  # 0.4 + 0.3 reaches 0.7
    assert kept(ar_prior.filter_logits(logits, top_p=0.71)) == [1, 3, 4]
    np.testing.assert_allclose(
        np.asarray(jax.nn.softmax(ar_prior.filter_logits(logits, temperature=0.5))),
        np.asarray(jax.nn.softmax(2 * logits)),
        atol=1e-6,
    )


def test_variant_table():
    paper = ar_prior.build("paper")
    assert paper.width == 1664 and paper.num_layers == 24 and paper.num_heads == 26 and paper.width // 26 == 64
    assert paper.num_components == 319 and paper.num_buckets == 1024 and paper.embedding_dim == 1024
    # Latent part of the context (z_t, dot, 319 codes) fits the paper's 384; the caption prefix is the paper CLIP
    # text tower's 77 states, what the cascade hands the prior.
    assert 2 + paper.num_components <= 384 and paper.seq_len == 77 + 319 + 1
    assert paper.num_text_tokens == clip.VARIANTS["paper"]["text"]["context_length"]
    n = ar_prior.num_params(paper)
    assert 0.7e9 < n < 1.1e9, n  # table 3: ~1B
    with pytest.raises(ValueError, match="variant"):
        ar_prior.build("nope")
