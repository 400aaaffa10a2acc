"""CLIP score arithmetic (raw cosine and Hessel's 100 * max(cos, 0)) and the embedding-function adapter."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.evaluate import clip_score as cs


def _close(a: dict, b: dict, rel: float = 1e-9) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], str) else a[k] == pytest.approx(b[k], rel=rel) for k in a
    )


def test_clip_score_arithmetic():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    txt = np.array([[2.0, 0.0], [0.0, -1.0], [1.0, 0.0]])  # cos = 1, -1, 1/sqrt(2)
    cos = np.array([1.0, -1.0, 1 / np.sqrt(2)])
    np.testing.assert_allclose(cs.cosine_similarity(img, txt), cos, rtol=1e-12)
    r = cs.clip_score(img, txt, "ViT-L/14")
    assert r["clip_model"] == "ViT-L/14" and r["num_pairs"] == 3
    assert r["clip_score_raw"] == pytest.approx(cos.mean())
    assert r["clip_score_raw_std"] == pytest.approx(cos.std())
    assert r["clip_score_hessel"] == pytest.approx(100 * np.maximum(cos, 0).mean())
    assert cs.clip_score(img, txt, "x", hessel_w=2.5)["clip_score_hessel"] == pytest.approx(
        2.5 * np.maximum(cos, 0).mean()
    )
    # Shards merge to the same report.
    a = cs.ClipScoreStats().update(cos[:1])
    b = cs.ClipScoreStats().update(cos[1:])
    assert _close(a.merge(b).report("ViT-L/14"), r)
    with pytest.raises(ValueError, match="must both be"):
        cs.cosine_similarity(img, txt[:2])


class _TinyClip(nn.Module):
    """Stand-in with the CLIP interface: encode_image / encode_text returning embedding dicts."""

    @nn.compact
    def __call__(self, pixels, ids):
        return self.encode_image(pixels), self.encode_text(ids)

    def setup(self):
        self.img = nn.Dense(4)
        self.tok = nn.Embed(10, 4)

    def encode_image(self, pixel_values):
        return {"image_embeds": self.img(pixel_values.reshape(pixel_values.shape[0], -1))}

    def encode_text(self, input_ids):
        return {"text_embeds": self.tok(input_ids).mean(1)}


def test_clip_embed_fns_adapter():
    model = _TinyClip()
    pixels = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 2, 2, 3)), jnp.float32)
    ids = jnp.asarray([[1, 2], [3, 4], [5, 6]])
    variables = model.init(jax.random.PRNGKey(0), pixels, ids)
    embed_img, embed_txt = cs.clip_embed_fns(model, variables)
    ie, te = model.apply(variables, pixels, ids)
    want = cs.clip_score(np.asarray(ie["image_embeds"]), np.asarray(te["text_embeds"]), "tiny")
    got = cs.clip_score_from_fns(embed_img, embed_txt, [(pixels[:2], ids[:2]), (pixels[2:], ids[2:])], "tiny")
    assert _close(got, want, rel=1e-6)
