"""Embedding precompute: resumable after a kill, exactly-once, equal to direct CLIP calls, host-sharded."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unclip_jax.input import arrayrecord, precompute, sources, testing
from unclip_jax.input.arrayrecord import ShardReader

TEXT_FN, IMAGE_FN = testing.fake_clip_encoders(projection_dim=8, width=16)


class Interrupted(Exception):
    pass


class InterruptingTokenizer:
    """The byte tokenizer, raising once ``after_shards`` shards are committed (a job killed mid-shard)."""

    def __init__(self, out_dir: str, after_shards: int = 1):
        self.out_dir, self.after_shards = out_dir, after_shards

    def __call__(self, captions):
        if len(arrayrecord.committed_shards(self.out_dir)) >= self.after_shards:
            raise Interrupted
        return testing.byte_tokenizer(captions)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 captioned images in assorted sizes and modes, plus one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    rows = []
    modes = ["RGB", "RGBA", "L", "P", "CMYK", "RGB"]
    for i in range(12):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(modes[i % len(modes)])
        name = f"img{i:02d}." + ("jpg" if img.mode in ("RGB", "L", "CMYK") else "png")
        img.save(root / name)
        rows.append({"file_name": name, "caption": f"picture number {i} of the folder"})
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    rows.insert(5, {"file_name": "broken.jpg", "caption": "a broken file"})
    with open(root / "captions.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def mock_coco():
    """tfds ``coco_captions`` mock data (no download); kept open for the module, set up once."""
    import tensorflow_datasets as tfds

    kw = dict(image_size=32, captions="all", min_size=4, skip_decoding=False)
    with tfds.testing.mock_data(num_examples=5):
        n = len(sources.CocoSource("karpathy_val", **kw))  # mock data has no split sizes: counted once
        yield lambda: sources.CocoSource("karpathy_val", num_items=n, **kw)


def _all_examples(src) -> list[dict]:
    out = []
    for _, item in src.iter_items(0, len(src)):
        if isinstance(item, list):
            out.extend(item)
    return out


def _records(folder: str) -> list[dict]:
    r = ShardReader(folder)
    return [r[i] for i in range(len(r))]


def _check_exactly_once_and_equal_to_direct_calls(out: str, expected: list[dict]):
    recs = _records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "duplicated examples"
    assert sorted(ids) == sorted(e["id"] for e in expected), "lost or extra examples"
    by_id = {e["id"]: e for e in expected}
    for r in recs:  # the stored image and caption are the source's
        assert r["caption"] == by_id[r["id"]]["caption"]
        np.testing.assert_array_equal(sources.decode_png(r["image_png"]), by_id[r["id"]]["image"])
    ids_arr = np.stack([r["input_ids"] for r in recs])
    images = np.stack([sources.decode_png(r["image_png"]) for r in recs])
    t = jax.jit(TEXT_FN)(ids_arr)
    v = jax.jit(IMAGE_FN)(images)
    stored = {k: np.stack([r[k] for r in recs]) for k in ("text_embeds", "text_hidden_states", "image_embeds")}
    np.testing.assert_allclose(stored["text_embeds"], t["text_embeds"], atol=1e-5)
    np.testing.assert_allclose(stored["text_hidden_states"], t["last_hidden_state"], atol=1e-6)
    np.testing.assert_allclose(stored["image_embeds"], v["image_embeds"], atol=1e-5)
    exp_ids, exp_mask = testing.byte_tokenizer([r["caption"] for r in recs])
    np.testing.assert_array_equal(ids_arr, exp_ids)
    np.testing.assert_array_equal(np.stack([r["text_mask"] for r in recs]), exp_mask)
    stats = precompute.load_image_embed_stats(out)
    np.testing.assert_allclose(stats["mean"], stored["image_embeds"].astype(np.float64).mean(0), atol=1e-9)
    np.testing.assert_allclose(stats["std"], stored["image_embeds"].astype(np.float64).std(0), atol=1e-7)
    assert int(stats["count"]) == len(recs)
    return recs


def _embed(src, out, tokenizer, **kw):
    return precompute.precompute_embeddings(
        src,
        out,
        tokenizer=tokenizer,
        encode_text_fn=TEXT_FN,
        encode_image_fn=IMAGE_FN,
        batch_size=8,
        clip_name="fake",
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("kind", ["folder", "coco", "synthetic"])
def test_killed_half_way_then_resumed_yields_every_example_once(kind, folder, mock_coco, tmp_path):
    make = {
        "folder": lambda: sources.FolderSource(folder, image_size=32),
        "coco": mock_coco,
        "synthetic": lambda: sources.SyntheticSource(13, seed=3, image_size=32),
    }[kind]
    shard_size = {"folder": 4, "coco": 2, "synthetic": 4}[kind]
    src = make()
    num_items, expected = len(src), _all_examples(src)
    out = str(tmp_path / "emb")
    num_shards = -(-num_items // shard_size)
    with pytest.raises(Interrupted):
        _embed(src, out, InterruptingTokenizer(out, after_shards=1), shard_size=shard_size)
    committed = arrayrecord.committed_shards(out)
    assert len(committed) == 1 < num_shards
    assert not os.path.exists(os.path.join(out, arrayrecord.MANIFEST))
    with pytest.raises(FileNotFoundError, match="not finished"):
        ShardReader(out)

    manifest = _embed(make(), out, testing.byte_tokenizer, shard_size=shard_size)  # a fresh process would
    assert manifest["num_records"] == len(expected)
    assert manifest["num_items"] == num_items
    if kind == "folder":
        assert manifest["skipped"]["counts"] == {"not_an_image": 1}
        assert len(expected) == 12
    if kind == "coco":
        assert len(expected) > num_items  # several captions per image
    _check_exactly_once_and_equal_to_direct_calls(out, expected)
    fields = manifest["fields"]
    assert fields["text_hidden_states"] == {"dtype": "float32", "shape": [77, 16]}
    assert fields["image_embeds"] == {"dtype": "float32", "shape": [8]}
    assert fields["input_ids"] == {"dtype": "int32", "shape": [77]}


def test_two_hosts_write_disjoint_shards_that_cover_the_source(tmp_path):
    src = sources.SyntheticSource(37, seed=0, image_size=32)
    out = str(tmp_path / "emb")
    r0 = _embed(src, out, testing.byte_tokenizer, shard_size=8, process_index=0, process_count=2)
    assert r0 == {"complete": False, "committed": 3, "num_shards": 5}
    assert sorted(arrayrecord.committed_shards(out)) == [0, 2, 4]
    manifest = _embed(src, out, testing.byte_tokenizer, shard_size=8, process_index=1, process_count=2)
    assert sorted(arrayrecord.committed_shards(out)) == [0, 1, 2, 3, 4]
    assert manifest["num_records"] == 37
    _check_exactly_once_and_equal_to_direct_calls(out, _all_examples(src))


def test_resume_with_different_settings_is_refused(tmp_path):
    src = sources.SyntheticSource(10, seed=0, image_size=32)
    out = str(tmp_path / "emb")
    _embed(src, out, testing.byte_tokenizer, shard_size=4)
    with pytest.raises(ValueError, match="shard_size"):
        _embed(src, out, testing.byte_tokenizer, shard_size=5)
    with pytest.raises(ValueError, match="seed"):
        _embed(sources.SyntheticSource(10, seed=1, image_size=32), out, testing.byte_tokenizer, shard_size=4)
    with pytest.raises(ValueError, match="scenes"):  # another scene distribution is another dataset
        _embed(
            sources.SyntheticSource(10, seed=0, image_size=32, scenes="large"),
            out,
            testing.byte_tokenizer,
            shard_size=4,
        )


def test_batch_is_sharded_over_the_local_devices():
    fn = precompute.EmbedFn(testing.byte_tokenizer, TEXT_FN, IMAGE_FN, batch_size=5)
    assert len(fn.devices) == 8 and fn.batch_size == 8
    x = fn._put(np.zeros((5, 77), np.int32))
    assert x.shape == (8, 77) and len(x.sharding.device_set) == 8
    assert x.sharding.shard_shape(x.shape) == (1, 77)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from unclip_jax.input import precompute, sources, testing
    def slow_tokenizer(captions):
        time.sleep(0.15)
        return testing.byte_tokenizer(captions)
    t, i = testing.fake_clip_encoders(projection_dim=8, width=16)
    precompute.precompute_embeddings(
        sources.SyntheticSource(60, seed=5, image_size=32), sys.argv[1], tokenizer=slow_tokenizer,
        encode_text_fn=t, encode_image_fn=i, batch_size=4, shard_size=4, clip_name="fake", progress=False)
    """
)


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real kill (SIGKILL of a subprocess at an arbitrary moment), then a resume in this process."""
    out = str(tmp_path / "emb")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, out], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            n = len(arrayrecord.committed_shards(out)) if os.path.isdir(out) else 0
            if n >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the subprocess never committed 3 shards")
        time.sleep(0.07)  # land somewhere inside the next shard
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = len(arrayrecord.committed_shards(out))
    assert 3 <= committed < 15
    src = sources.SyntheticSource(60, seed=5, image_size=32)
    manifest = precompute.precompute_embeddings(
        src,
        out,
        tokenizer=testing.byte_tokenizer,
        encode_text_fn=TEXT_FN,
        encode_image_fn=IMAGE_FN,
        batch_size=4,
        shard_size=4,
        clip_name="fake",
        progress=False,
    )
    assert manifest["num_records"] == 60
    _check_exactly_once_and_equal_to_direct_calls(out, _all_examples(src))


def test_real_tiny_clip_stored_embeddings_equal_direct_call(tmp_path):
    """The real CLIP "test" variant and tokenizer; stored fields == a direct (independently jitted) call.

    Random parameters come from the abstract init (no init compile); the job runs on one
    device here (sharding is covered above) to keep the compile time down.
    """
    import flax.linen as nn

    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models import clip

    model = clip.build("test")
    size = clip.VARIANTS["test"]["vision"]["image_size"]
    tok = ClipTokenizer()
    abstract = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32), jnp.zeros((1, size, size, 3), jnp.float32)
    )
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), nn.unbox(abstract))
    text_fn, image_fn = precompute.clip_encoders(model, variables)
    src = sources.SyntheticSource(11, seed=0, image_size=64)
    out = str(tmp_path / "emb")
    m = precompute.precompute_embeddings(
        src,
        out,
        tokenizer=tok,
        encode_text_fn=text_fn,
        encode_image_fn=image_fn,
        batch_size=8,
        shard_size=6,
        clip_name="clip/test",
        progress=False,
        devices=jax.devices()[:1],
    )
    assert m["num_records"] == 11
    recs = _records(out)
    exs = _all_examples(src)
    assert [r["id"] for r in recs] == [e["id"] for e in exs]
    ids, mask = tok([e["caption"] for e in exs])
    images = np.stack([e["image"] for e in exs])

    @jax.jit
    def direct(ids, images):
        t = model.apply(variables, ids, method=model.encode_text)
        v = model.apply(variables, clip.preprocess_images(images, size), method=model.encode_image)
        return t["text_embeds"], t["last_hidden_state"], v["image_embeds"]

    t_emb, hidden, i_emb = direct(jnp.asarray(ids), jnp.asarray(images))
    stored = {k: np.stack([r[k] for r in recs]) for k in recs[0] if k in precompute_fields()}
    np.testing.assert_array_equal(stored["input_ids"], ids)
    np.testing.assert_array_equal(stored["text_mask"], mask)
    err = {
        "text_embeds": np.abs(stored["text_embeds"] - np.asarray(t_emb)).max(),
        "text_hidden_states": np.abs(stored["text_hidden_states"] - np.asarray(hidden)).max(),
        "image_embeds": np.abs(stored["image_embeds"] - np.asarray(i_emb)).max(),
    }
    assert max(err.values()) < 1e-5, err
    assert np.abs(stored["image_embeds"]).max() > 1e-3  # not trivially zero
    assert Image.open(io.BytesIO(recs[0]["image_png"])).size == (64, 64)
    # The empty caption's encoding, which the tasks use for dropped captions (and the samplers for guidance).
    assert m["null_caption"] == precompute.NULL_CAPTION_FILE
    null_ids, null_mask = tok([""])
    t_null, hidden_null, _ = direct(jnp.asarray(null_ids), jnp.asarray(images[:1]))
    with np.load(os.path.join(out, precompute.NULL_CAPTION_FILE)) as null:
        np.testing.assert_array_equal(null["text_mask"], null_mask)
        np.testing.assert_allclose(null["text_embeds"], np.asarray(t_null), atol=1e-5)
        np.testing.assert_allclose(null["text_hidden_states"], np.asarray(hidden_null), atol=1e-5)


def precompute_fields() -> tuple[str, ...]:
    return ("input_ids", "text_mask", "text_hidden_states", "text_embeds", "image_embeds")
