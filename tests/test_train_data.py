"""The shared tiny dataset of the train tests: the built-in synthetic set embedded by the CLIP ``test`` variant.

One "embed" shard folder (images + tokens + CLIP embeddings) serves all four stages, so
the train tests run through the real pipelines of :mod:`unclip_jax.input.pipelines`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

NUM_EXAMPLES = 32
IMAGE_SIZE = 32


def make_embed_folder(out: str, num_examples: int = NUM_EXAMPLES) -> str:
    """Writes (once) the embed folder at ``out`` with a randomly initialised CLIP ``test`` model."""
    from unclip_jax.input import precompute, sources
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models import clip

    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    model = clip.build("test")
    ids = np.zeros((1, 77), np.int32)
    pix = np.zeros((1, 32, 32, 3), np.float32)
    variables = model.init(jax.random.PRNGKey(0), ids, pix)
    text_fn, image_fn = precompute.clip_encoders(model, variables)
    precompute.precompute_embeddings(
        sources.SyntheticSource(num_examples, seed=0, image_size=IMAGE_SIZE),
        out,
        tokenizer=ClipTokenizer(),
        encode_text_fn=text_fn,
        encode_image_fn=image_fn,
        batch_size=16,
        clip_name="clip:test:seed0",
        shard_size=16,
        progress=False,
        devices=jax.local_devices()[:1],
    )
    return out


def test_embed_folder_feeds_every_stage(tmp_path):
    from unclip_jax.input import pipelines

    folder = make_embed_folder(str(tmp_path / "embed"), num_examples=8)
    want = {
        "prior": {"image_embeds": (4, 32), "text_hidden_states": (4, 77, 32)},
        "decoder": {"image": (4, 16, 16, 3), "text_embeds": (4, 32)},
        "upsampler": {"image": (4, 16, 16, 3), "low_res": (4, 4, 4, 3)},
        "clip": {"pixel_values": (4, 32, 32, 3), "input_ids": (4, 77)},
    }
    kw = dict(image_size=16, target_size=32, crop_fraction=0.5, read_threads=1, prefetch_batches=0)
    for stage, shapes in want.items():
        if stage == "clip":
            kw["image_size"] = 32
        batch = next(iter(pipelines.make_pipeline(stage, folder, global_batch_size=4, seed=0, **kw)))
        for key, shape in shapes.items():
            assert batch[key].shape == shape, (stage, key, batch[key].shape)
