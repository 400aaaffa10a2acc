"""Per-stage grain pipelines: shapes/dtypes, determinism, checkpointable state, host sharding."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

from unclip_jax import parallel
from unclip_jax.input import pipelines, precompute, sources, synthetic, testing
from unclip_jax.input.arrayrecord import ShardReader

N = 40


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("embed"))
    testing.make_embed_folder(d, num_examples=N, image_size=128, seed=0)
    return d


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("prepared"))
    precompute.prepare(sources.SyntheticSource(24, seed=1, image_size=64), d, shard_size=8, progress=False)
    return d


@contextlib.contextmanager
def _iterate(ds):
    it = iter(ds)
    try:
        yield it
    finally:
        it.close()


def _take(ds, n):
    with _iterate(ds) as it:
        return [next(it) for _ in range(n)]


EXPECTED = {
    "prior": {
        "input_ids": ((4, 77), np.int32),
        "text_mask": ((4, 77), np.bool_),
        "text_hidden_states": ((4, 77, 16), np.float32),
        "text_embeds": ((4, 8), np.float32),
        "image_embeds": ((4, 8), np.float32),
    },
    "upsampler": {"image": ((4, 32, 32, 3), np.float32), "low_res": ((4, 8, 8, 3), np.float32)},
    "clip": {
        "pixel_values": ((4, 32, 32, 3), np.float32),
        "input_ids": ((4, 77), np.int32),
        "text_mask": ((4, 77), np.bool_),
    },
}
EXPECTED["decoder"] = {**EXPECTED["prior"], "image": ((4, 64, 64, 3), np.float32)}
KW = {
    "prior": {},
    "decoder": {"image_size": 64},
    "upsampler": {"target_size": 128, "crop_fraction": 0.25, "degradation": "blur"},
    "clip": {"image_size": 32},
}


@pytest.mark.parametrize("stage", pipelines.STAGES)
def test_each_stage_yields_its_fields(stage, embed_dir):
    ds = pipelines.make_pipeline(stage, embed_dir, global_batch_size=4, seed=0, **KW[stage])
    (batch,) = _take(ds, 1)
    got = {k: (v.shape, v.dtype.type) for k, v in batch.items()}
    assert got == EXPECTED[stage]
    for k in ("image", "low_res"):
        if k in batch:
            assert -1.0 <= batch[k].min() and batch[k].max() <= 1.0 and batch[k].std() > 0.05


def test_decoder_fields_match_the_stored_records(embed_dir):
    """Unshuffled, one host: batch rows are the records in order, images resized from 128 to 64."""
    ds = pipelines.make_pipeline("decoder", embed_dir, global_batch_size=5, seed=0, shuffle=False, num_epochs=1)
    (batch,) = _take(ds, 1)
    reader = ShardReader(embed_dir)
    for i in range(5):
        rec = reader[i]
        for k in pipelines.EMBED_FIELDS:
            np.testing.assert_array_equal(batch[k][i], rec[k])
        img = sources.center_crop_arr(sources.decode_png(rec["image_png"]), 64)
        np.testing.assert_allclose(batch["image"][i], img / 127.5 - 1.0, atol=1e-6)


def test_upsampler_low_res_is_the_degraded_crop(embed_dir):
    """Blur: the low-res input equals blur_degradation of the high-res crop (crop 1/4 of target 128)."""
    from unclip_jax.input import degradations

    ds = pipelines.make_pipeline("upsampler", embed_dir, global_batch_size=3, seed=0, **KW["upsampler"])
    (b,) = _take(ds, 1)
    for i in range(3):
        want = degradations.blur_degradation((b["image"][i] + 1) / 2) * 2 - 1
        np.testing.assert_allclose(b["low_res"][i], want, atol=1e-5)
    bsr = pipelines.make_pipeline(
        "upsampler", embed_dir, global_batch_size=3, seed=0, **{**KW["upsampler"], "degradation": "bsr"}
    )
    (c,) = _take(bsr, 1)
    np.testing.assert_array_equal(c["image"], b["image"])  # same crops, other corruption
    assert c["low_res"].shape == (3, 8, 8, 3) and not np.allclose(c["low_res"], b["low_res"])


def test_same_seed_same_stream_other_seed_differs(embed_dir):
    kw = dict(global_batch_size=4, **KW["upsampler"])
    a = _take(pipelines.make_pipeline("upsampler", embed_dir, seed=3, **kw), 3)
    b = _take(pipelines.make_pipeline("upsampler", embed_dir, seed=3, **kw), 3)
    c = _take(pipelines.make_pipeline("upsampler", embed_dir, seed=4, **kw), 3)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("prefetch", ["thread", "none"])
def test_iterator_state_restores_the_exact_stream(embed_dir, prefetch):
    kw = dict(global_batch_size=4, seed=0, prefetch_batches=2 if prefetch == "thread" else 0, **KW["upsampler"])
    with _iterate(pipelines.make_pipeline("upsampler", embed_dir, **kw)) as it:
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(12)]  # crosses the epoch boundary (40 records / 4)
    with _iterate(pipelines.make_pipeline("upsampler", embed_dir, **kw)) as it2:
        it2.set_state(state)
        got = [next(it2) for _ in range(12)]
    for x, y in zip(expected, got, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _ids(folder, stage, pi, pc, epochs=1, **kw):
    ds = pipelines.make_pipeline(
        stage,
        folder,
        global_batch_size=4,
        seed=0,
        num_epochs=epochs,
        drop_remainder=False,
        process_index=pi,
        process_count=pc,
        **kw,
    )
    with _iterate(ds) as it:
        return [b for b in it]


def test_two_hosts_get_disjoint_records_that_cover_the_data(embed_dir):
    """Each host yields global_batch / 2 rows; the two hosts' text_embeds rows partition the dataset."""
    reader = ShardReader(embed_dir)
    all_rows = {reader[i]["text_embeds"].tobytes() for i in range(len(reader))}
    seen = []
    for pi in range(2):
        batches = _ids(embed_dir, "prior", pi, 2)
        assert all(b["text_embeds"].shape[0] == 2 for b in batches)
        seen.append([r.tobytes() for b in batches for r in b["text_embeds"]])
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == all_rows
    assert pipelines.host_records(N, 1, 2) == range(1, N, 2)


def test_epoch_covers_each_record_once_and_reshuffles(embed_dir):
    ds = pipelines.make_pipeline("prior", embed_dir, global_batch_size=4, seed=0, num_epochs=2)
    rows = [r.tobytes() for b in _take(ds, 20) for r in b["text_embeds"]]
    first, second = rows[:N], rows[N:]
    assert len(set(first)) == N and set(first) == set(second)
    assert first != second  # a new order each epoch


def test_clip_stage_over_a_prepared_folder_tokenises(prepared_dir):
    ds = pipelines.make_pipeline("clip", prepared_dir, global_batch_size=4, seed=0, tokenizer=testing.byte_tokenizer)
    (b,) = _take(ds, 1)
    assert b["input_ids"].shape == (4, 77) and b["input_ids"].dtype == np.int32
    assert (b["input_ids"][:, 0] == testing.SOT).all()
    mean = np.asarray(pipelines.CLIP_MEAN, np.float32)
    assert b["pixel_values"].shape == (4, 64, 64, 3)
    assert (b["pixel_values"] * np.asarray(pipelines.CLIP_STD) + mean).max() <= 1.0 + 1e-5
    with pytest.raises(KeyError, match="embed"):
        _take(pipelines.make_pipeline("prior", prepared_dir, global_batch_size=4), 1)


def test_clip_stage_hard_negatives(prepared_dir, embed_dir):
    """``caption_swaps``: each example's caption with one shape word swapped, tokenised like the caption."""
    swaps = synthetic.shape_swaps()
    assert swaps == "circle,square,triangle,cross;circles,squares,triangles,crosses"
    ds = pipelines.make_pipeline(
        "clip", prepared_dir, global_batch_size=8, seed=0, caption_swaps=swaps, tokenizer=testing.byte_tokenizer
    )
    (b,) = _take(ds, 1)
    assert b["negative_input_ids"].shape == (8, 77) and b["negative_valid"].shape == (8,)
    assert b["negative_valid"].all()  # every synthetic caption names a shape

    def text(ids):
        return bytes(int(t) for t in ids if 0 < t < 256).decode()

    words = set(swaps.replace(";", ",").split(","))
    for pos, neg in zip(b["input_ids"], b["negative_input_ids"]):
        a, n = text(pos).split(" "), text(neg).split(" ")
        changed = [(x, y) for x, y in zip(a, n) if x != y]
        assert len(a) == len(n) and len(changed) == 1 and set(changed[0]) <= words, (text(pos), text(neg))
    with pytest.raises(ValueError, match="caption_swaps is for the clip pipeline, not 'prior'"):
        pipelines.make_pipeline("prior", embed_dir, global_batch_size=4, caption_swaps=swaps)
    with pytest.raises(ValueError, match="caption_swaps needs the clip pipeline's tokenizer"):
        pipelines.make_pipeline("clip", prepared_dir, global_batch_size=4, caption_swaps=swaps)


def test_global_batch_must_split_over_hosts(embed_dir):
    with pytest.raises(ValueError, match="divisible by process_count 3"):
        pipelines.make_pipeline("prior", embed_dir, global_batch_size=4, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="target_size"):
        _take(pipelines.make_pipeline("upsampler", embed_dir, global_batch_size=2, target_size=256), 1)


def test_global_batch_shards_over_the_data_axis(embed_dir):
    """A pipeline's per-process batch becomes global arrays sharded over the mesh's data axis (as the loop feeds)."""
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert mesh.shape["data"] == len(jax.devices()) == 8
    (b,) = _take(pipelines.make_pipeline("prior", embed_dir, global_batch_size=8, seed=0), 1)
    g = parallel.global_batch(b, mesh)
    assert g["text_hidden_states"].shape == (8, 77, 16)
    assert g["text_hidden_states"].sharding.shard_shape((8, 77, 16)) == (1, 77, 16)
    np.testing.assert_array_equal(np.asarray(g["input_ids"]), b["input_ids"])
