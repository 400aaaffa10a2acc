"""Stand-ins for tests: a byte tokenizer, a tiny deterministic "CLIP", and a ready embed folder.

They let tests of the input code (and of the train loop) build real shard folders in
well under a second without a CLIP checkpoint. Not for training anything real.
"""

from __future__ import annotations

import numpy as np

CONTEXT = 77
SOT, EOT = 49406, 49407


def byte_tokenizer(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes as token ids between CLIP's start/end ids; ``(int32 [B, 77], bool [B, 77])``."""
    ids = np.zeros((len(captions), CONTEXT), np.int32)
    mask = np.zeros((len(captions), CONTEXT), bool)
    for i, c in enumerate(captions):
        toks = [SOT, *c.encode("utf-8")[: CONTEXT - 2], EOT]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = True
    return ids, mask


def fake_clip_encoders(projection_dim: int = 8, width: int = 16, seed: int = 0):
    """``(encode_text_fn, encode_image_fn)`` with the shapes of a CLIP: jnp functions of random tables.

    text: ``last_hidden_state = table[ids]`` [B, L, width]; ``text_embeds`` its mean
    over tokens projected to ``projection_dim``. image: channel means and a 4x4 average
    pooling of the uint8 image, projected.
    """
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    table = jax.random.normal(k1, (49408, width))
    wt = jax.random.normal(k2, (width, projection_dim)) / np.sqrt(width)
    wi = jax.random.normal(k3, (48, projection_dim)) / np.sqrt(48)

    def encode_text_fn(input_ids):
        h = table[input_ids]
        return {"last_hidden_state": h, "text_embeds": h.mean(1) @ wt}

    def encode_image_fn(images):
        x = images.astype(jnp.float32) / 255.0
        b, hh, ww, c = x.shape
        x = x.reshape(b, 4, hh // 4, 4, ww // 4, c).mean((2, 4)).reshape(b, -1)
        return {"image_embeds": x @ wi}

    return encode_text_fn, encode_image_fn


def make_embed_folder(folder: str, num_examples: int = 32, image_size: int = 64, seed: int = 0, **kwargs) -> dict:
    """Synthetic examples through the fake CLIP into an "embed" shard folder; returns the manifest."""
    from unclip_jax.input.precompute import precompute_embeddings
    from unclip_jax.input.sources import SyntheticSource

    text_fn, image_fn = fake_clip_encoders()
    kwargs.setdefault("shard_size", 16)
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("progress", False)
    return precompute_embeddings(
        SyntheticSource(num_examples, seed=seed, image_size=image_size),
        folder,
        tokenizer=byte_tokenizer,
        encode_text_fn=text_fn,
        encode_image_fn=image_fn,
        clip_name="fake",
        **kwargs,
    )
