"""The shared tiny dataset of the train tests: the built-in synthetic set embedded by the CLIP ``test`` variant.

One "embed" shard folder (images + tokens + CLIP embeddings) serves all four stages, so
the train tests run through the real pipelines of :mod:`unclip_jax.input.pipelines`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import jax
import numpy as np

NUM_EXAMPLES = 32
IMAGE_SIZE = 32


def _code_hash() -> str:
    import unclip_jax.input as inp
    import unclip_jax.models.clip as clip_mod

    h = hashlib.sha256()
    folder = os.path.dirname(inp.__file__)
    for name in ("precompute.py", "arrayrecord.py", "synthetic.py", "sources.py", "tokenizer.py"):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    with open(clip_mod.__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def shared_embed_folder() -> str:
    """The embed folder of :data:`NUM_EXAMPLES` examples, built once per code version in the temp dir.

    Building it compiles a CLIP (tens of seconds on a loaded 2-core machine), so every
    train test module and subprocess shares one copy (atomic rename; a concurrent builder
    simply loses the race).
    """
    out = os.path.join(tempfile.gettempdir(), f"unclip_jax_train_tests_{_code_hash()}")
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    tmp = tempfile.mkdtemp(prefix="unclip_jax_train_tests_build_")
    make_embed_folder(os.path.join(tmp, "embed"))
    try:
        os.rename(os.path.join(tmp, "embed"), out)
    except OSError:
        pass  # another process won
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_embed_folder(out: str, num_examples: int = NUM_EXAMPLES) -> str:
    """Writes the embed folder at ``out`` with a randomly initialised CLIP ``test`` model."""
    from unclip_jax.input import precompute, sources
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models import clip

    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    model = clip.build("test")
    ids = np.zeros((1, 77), np.int32)
    pix = np.zeros((1, 32, 32, 3), np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), ids, pix)
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


def test_embed_folder_feeds_every_stage():
    from unclip_jax.input import pipelines

    folder = shared_embed_folder()
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


def experiment(stage: str, arg: str = "test", **overrides):
    """``experiments/<stage>.py:<arg>`` with the shared data folder and dotted overrides (``**{"optim.lr": 1e-3}``),
    as ``unclip train --config=... --config.<field>=...`` builds it."""
    from unclip_jax.train.config_loading import load_experiment

    return load_experiment(f"experiments/{stage}.py:{arg}", {"data.folder": shared_embed_folder(), **overrides})


def first_batch(config) -> dict:
    """The first per-process batch of the config's real pipeline."""
    from unclip_jax.train import loop

    return next(loop.make_train_iterator(config))
