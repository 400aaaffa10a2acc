"""MS-COCO zero-shot protocol on tfds mock COCO with the `test` cascade and the `test` Inception.

Kill-and-resume equals an uninterrupted run (same seed -> identical shards -> same FID), finished shards are not
redone, captions are deterministic and one per image, the reference statistics are those of the selected images,
the report is complete, and ``unclip evaluate`` runs end to end from a model folder, and resumes after its process
was SIGKILLed in the middle of writing a shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from unclip_jax.evaluate import commands, generation, protocol, reference
from unclip_jax.evaluate import instruments as instruments_lib
from unclip_jax.evaluate import report as report_lib
from unclip_jax.evaluate.fid import FeatureStats, fid_from_features, load_stats
from unclip_jax.input import sources
from unclip_jax.pipeline import StageSettings
from unclip_jax.pipeline import testing as pipe_testing
from unclip_jax.pipeline.loading import load_pipeline

NUM_EXAMPLES = 12  # images in the mock val2014 pool
CONFIG = protocol.ProtocolConfig(num_captions=8, seed=3, image_size=32, shard_size=3, batch_size=8, kid_subsets=5)
SETTINGS = {
    "prior": StageSettings(2, guidance_scale=2.0),
    "decoder": StageSettings(2, guidance_scale=3.0),
    "super_res": StageSettings(2),
}
SOURCE_KW = dict(image_size=32, captions="all", min_size=4, skip_decoding=False)


@pytest.fixture(scope="module")
def mock_coco():
    """tfds ``coco_captions`` mock data, val2014 pool of 12 images; yields a source factory."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        n = len(sources.CocoSource("val2014", **SOURCE_KW))
        yield lambda: sources.CocoSource("val2014", num_items=n, **SOURCE_KW)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The random `test` cascade saved as native components (what ``unclip evaluate --model`` reads)."""
    return pipe_testing.save_native_pipeline(pipe_testing.random_pipeline("test"), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pipe(model_dir):
    # Loaded from the folder, like the command does (so both share one compiled cascade).
    return load_pipeline(model_dir, require=("text_encoder", "decoder", "prior", "super_res_first", "image_encoder"))


@pytest.fixture(scope="module")
def instruments(pipe):
    features, ident = instruments_lib.inception_instrument("test")
    return protocol.Instruments(features, ident, instruments_lib.pipeline_clip_scorer(pipe, "test cascade CLIP"))


class CountingGenerator:
    """Wraps a generate_fn: counts calls; raises after ``fail_after`` calls (a job killed mid-shard)."""

    def __init__(self, fn, fail_after: int | None = None):
        self.fn, self.fail_after, self.calls = fn, fail_after, 0

    def __call__(self, captions, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.fn(captions, seed)


def _generator(pipe, fn_wrapper=None, settings=SETTINGS):
    g = generation.pipeline_generator(pipe, settings, model={"name": "random test cascade, seed 0"}, num_candidates=1)
    if fn_wrapper is not None:
        g = dataclasses.replace(g, fn=fn_wrapper(g.fn))
    return g


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mock_coco, pipe, instruments):
    root = tmp_path_factory.mktemp("eval")
    counter = CountingGenerator(_generator(pipe).fn)
    gen = dataclasses.replace(_generator(pipe), fn=counter)
    report = report_lib.evaluate(mock_coco, root / "ref", root / "run", CONFIG, gen, instruments, progress=False)
    return dict(root=root, report=report, calls=counter.calls)


def test_caption_selection_is_deterministic_and_one_per_image(mock_coco, uninterrupted):
    a = protocol.select_items(40_504, 30_000, 0)
    b = protocol.select_items(40_504, 30_000, 0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(np.unique(a[0])) == 30_000 and np.all(np.diff(a[0]) > 0)
    assert not np.array_equal(protocol.select_items(40_504, 30_000, 1)[0], a[0])
    with pytest.raises(ValueError, match="only 12 images"):
        protocol.select_items(12, 13, 0)

    # The selected captions are exactly the draws of select_items from the source's captions, one per image.
    caps = reference.load_captions(uninterrupted["root"] / "ref")
    items, u = protocol.select_items(NUM_EXAMPLES, CONFIG.num_captions, CONFIG.seed)
    assert [c["item"] for c in caps] == items.tolist()
    assert len({c["item"] for c in caps}) == CONFIG.num_captions
    src = mock_coco()
    for c, item, uk in zip(caps, items, u, strict=True):
        ((_, examples),) = list(src.iter_items(int(item), int(item) + 1))
        ex = examples[protocol.pick_caption(len(examples), uk)]
        assert (c["caption"], c["id"]) == (ex["caption"], ex["id"])


def test_reference_stats_are_the_selected_images_features(mock_coco, uninterrupted, instruments):
    ref = uninterrupted["root"] / "ref"
    caps = reference.load_captions(ref)
    src = mock_coco()
    images = {}
    for c in caps:
        ((_, examples),) = list(src.iter_items(c["item"], c["item"] + 1))
        images[c["item"]] = examples[0]["image"]  # every caption of an item shares its (32x32 centre-cropped) image
    x = np.stack([images[c["item"]] for c in caps])
    direct = instruments.features(x)  # 8 images = one batch
    mu, sigma = load_stats(ref / "reference_stats.npz")  # pytorch-fid's keys
    np.testing.assert_allclose(mu, direct.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(direct.astype(np.float64), rowvar=False), rtol=1e-4, atol=1e-7)
    assert FeatureStats.load(ref / "reference_stats.npz").n == CONFIG.num_captions


def test_report_is_complete_and_consistent(uninterrupted):
    root, rep = uninterrupted["root"], uninterrupted["report"]
    assert json.loads((root / "run" / "report.json").read_text()) == rep
    res = rep["results"]
    for k in ("fid", "kid_mean", "kid_std", "clip_score_raw", "clip_score_hessel", "clip_score_raw_std"):
        assert np.isfinite(res[k]), k
    assert rep["num_generated"] == CONFIG.num_captions and res["num_pairs"] == CONFIG.num_captions
    assert rep["config"]["seed"] == CONFIG.seed and rep["config"]["num_captions"] == CONFIG.num_captions
    stages = rep["generation"]["stages"]
    assert stages["decoder"]["guidance_scale"] == 3.0 and stages["prior"]["guidance_scale"] == 2.0
    assert stages["decoder"]["steps"] == 2 and stages["decoder"]["sampler"] == "ddpm"
    assert rep["generation"]["num_candidates"] == 1
    assert rep["model"] == {"name": "random test cascade, seed 0"}
    assert rep["clip_model"] == "test cascade CLIP" and rep["inception"]["variant"] == "test"
    assert rep["reference"]["num_images"] == CONFIG.num_captions
    # FID from the merged per-shard statistics equals FID of all features at once.
    gen = np.concatenate([generation.load_generated_shard(root / "run", j)["features"] for j in range(3)])
    ref = np.concatenate([reference.load_reference_shard(root / "ref", j)["features"] for j in range(3)])
    assert res["fid"] == pytest.approx(fid_from_features(gen, ref), rel=1e-9)
    # Hessel's score is 100 * mean(max(cos, 0)) of the stored cosines.
    cos = np.concatenate([generation.load_generated_shard(root / "run", j)["cos"] for j in range(3)])
    assert res["clip_score_hessel"] == pytest.approx(100 * np.maximum(cos, 0).mean(), rel=1e-12)
    # 3 shards of 3, 3, 2 captions, one generation batch (8, padded) each.
    assert uninterrupted["calls"] == 3


def test_killed_and_resumed_equals_uninterrupted(tmp_path, mock_coco, pipe, instruments, uninterrupted):
    ref = uninterrupted["root"] / "ref"
    # Reference: interrupted after 1 shard, resumed -> identical statistics and captions.
    ref2 = tmp_path / "ref"
    with pytest.raises(protocol.Interrupted):
        reference.prepare_reference(
            mock_coco, ref2, CONFIG, instruments.features, instruments.inception, progress=False, stop_after_shards=1
        )
    assert sorted(p.name for p in (ref2 / "shards").iterdir()) == ["ref_00000.npz"]
    reference.prepare_reference(mock_coco, ref2, CONFIG, instruments.features, instruments.inception, progress=False)
    assert (ref2 / "captions.jsonl").read_text() == (ref / "captions.jsonl").read_text()
    with np.load(ref / "reference_stats.npz") as a, np.load(ref2 / "reference_stats.npz") as b:
        for k in ("mu", "sigma", "m2", "n"):
            np.testing.assert_array_equal(a[k], b[k])

    # Generation: killed during the second shard (after one batch), then resumed.
    run = tmp_path / "run"
    killed = CountingGenerator(_generator(pipe).fn, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        report_lib.evaluate(
            mock_coco, ref2, run, CONFIG, _generator(pipe, lambda f: killed), instruments, progress=False
        )
    done = sorted(p.name for p in (run / "shards").iterdir())
    assert done == ["gen_00000.npz"] and not (run / "report.json").exists()
    stamp = os.stat(run / "shards" / "gen_00000.npz").st_mtime_ns

    resumed = CountingGenerator(_generator(pipe).fn)
    rep = report_lib.evaluate(
        mock_coco, ref2, run, CONFIG, _generator(pipe, lambda f: resumed), instruments, progress=False
    )
    assert resumed.calls == 2  # only the two unfinished shards were generated
    assert os.stat(run / "shards" / "gen_00000.npz").st_mtime_ns == stamp
    for j in range(CONFIG.num_shards):
        a = generation.load_generated_shard(uninterrupted["root"] / "run", j)
        b = generation.load_generated_shard(run, j)
        for k in ("features", "image_embeds", "text_embeds", "cos"):
            np.testing.assert_array_equal(a[k], b[k])
    want = uninterrupted["report"]["results"]
    assert rep["results"]["fid"] == want["fid"]
    assert rep["results"]["kid_mean"] == want["kid_mean"]
    assert rep["results"]["clip_score_raw"] == want["clip_score_raw"]

    # Resuming with other settings is refused, naming what differs.
    other = {**SETTINGS, "decoder": StageSettings(2, guidance_scale=5.0)}
    with pytest.raises(ValueError, match="generation"):
        generation.generate_shards(ref2, run, CONFIG, _generator(pipe, settings=other), instruments, progress=False)
    with pytest.raises(ValueError, match="seed"):
        reference.prepare_reference(
            mock_coco, ref2, dataclasses.replace(CONFIG, seed=4), instruments.features, instruments.inception
        )


def test_hosts_take_disjoint_shards():
    shards = [protocol.host_shards(10, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert shards[1] == [1, 4, 7]


def _evaluate_argv(model, out, ref) -> list[str]:
    """``unclip evaluate`` arguments of the in-process run's protocol, settings and seed."""
    return [
        "--model", str(model), "--out", str(out), "--reference-dir", str(ref),
        "--num-captions", "8", "--seed", "3", "--image-size", "32", "--shard-size", "3", "--batch-size", "8",
        "--kid-subsets", "5", "--candidates", "1", "--inception", "test", "--clip-name", "test cascade CLIP",
        "--prior-steps", "2", "--prior-guidance", "2", "--decoder-steps", "2", "--decoder-guidance", "3",
        "--super-res-steps", "2", "--tfds-decode", "--min-size", "4", "--split", "val2014",
    ]  # fmt: skip


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    return parser


def test_unclip_evaluate_command_end_to_end(tmp_path, mock_coco, model_dir, uninterrupted, capsys):
    """``unclip evaluate`` from a native model folder reproduces the in-process run (same settings and seed)."""
    model = model_dir
    argv = _evaluate_argv(model, tmp_path / "out", uninterrupted["root"] / "ref")
    assert commands.run(_evaluate_parser().parse_args(argv)) == 0  # (the mock COCO of the fixture is active)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "FID" in capsys.readouterr().out
    assert rep["model"]["model_dir"]["path"] == str(model.resolve())
    assert any(f.endswith(".safetensors") for f in rep["model"]["model_dir"]["files"])
    assert rep["results"]["fid"] == uninterrupted["report"]["results"]["fid"]  # same weights, seed, settings
    assert jax.local_device_count() == 8 and rep["environment"]["local_devices"] == 8


def test_sharded_generation_equals_unsharded(pipe):
    """Captions split over 8 devices give the samples of the pipeline's own single-device call."""
    captions = [f"a photo of thing number {i}" for i in range(8)]
    sharded = _generator(pipe).fn(captions, 5)
    one = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    single = generation.pipeline_generator(pipe, SETTINGS, model={}, num_candidates=1, mesh=one).fn(captions, 5)
    assert sharded.shape == single.shape == (8, 32, 32, 3) and sharded.dtype == np.uint8
    diff = np.abs(sharded.astype(int) - single.astype(int))
    # Equal up to float noise: the 8-way and the 1-way programs sum in different orders, and the sampler can carry
    # that into a level or two of a rare pixel (one pixel of 24,576 at 3 levels in a clean-clone CI run); a sharding
    # bug (captions, seeds or shards out of order) changes nearly every pixel by tens of levels.
    assert (diff == 0).mean() > 0.99 and (diff <= 1).mean() > 0.999 and diff.max() <= 8, (
        diff.max(),
        (diff == 0).mean(),
    )
    assert np.ptp(sharded) > 50  # real images, not a constant


# A real ``unclip evaluate`` process, with the tfds mock COCO and the tests' 8 CPU devices, whose ``np.savez`` of the
# second generated shard writes half of the file and then SIGKILLs its own process (a job killed mid-write).
_KILLED_MID_WRITE = """
import os, signal, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
import tensorflow_datasets as tfds
from unclip_jax import cli

real_savez = np.savez

def savez(file, *args, **arrays):
    real_savez(file, *args, **arrays)
    if "gen_00001" in os.fspath(file):
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

np.savez = savez
with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
    sys.exit(cli.main(["evaluate", *sys.argv[2:]]))
"""


def test_process_killed_mid_write_resumes_to_the_uninterrupted_report(tmp_path, mock_coco, model_dir, uninterrupted):
    """SIGKILL of ``unclip evaluate`` while it writes shard 1: shard 0 stays finished, the half-written file is not
    taken for a shard, and the command run again generates only shards 1 and 2 and reports the uninterrupted FID."""
    out = tmp_path / "out"
    argv = _evaluate_argv(model_dir, out, uninterrupted["root"] / "ref")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(NUM_EXAMPLES), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    shards = out / "shards"
    names = sorted(p.name for p in shards.iterdir())
    assert "gen_00000.npz" in names and "gen_00001.npz" not in names, names
    partial = [n for n in names if n.startswith(".gen_00001.npz.tmp-")]
    assert len(partial) == 1, names  # the half-written temporary file is all that is left of shard 1
    assert not (out / "report.json").exists()
    stamp = os.stat(shards / "gen_00000.npz").st_mtime_ns

    assert commands.run(_evaluate_parser().parse_args(argv)) == 0  # resumed (the fixture's mock COCO is active)
    assert os.stat(shards / "gen_00000.npz").st_mtime_ns == stamp  # finished shards are not redone
    for j in range(CONFIG.num_shards):
        a = generation.load_generated_shard(uninterrupted["root"] / "run", j)
        b = generation.load_generated_shard(out, j)
        for k in ("features", "image_embeds", "text_embeds", "cos"):
            np.testing.assert_array_equal(a[k], b[k])
    rep = json.loads((out / "report.json").read_text())
    assert rep["results"]["fid"] == uninterrupted["report"]["results"]["fid"]
