"""The demo: resume logic (done markers), the HTML report, and one end-to-end ``--fast`` run (every stage)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import math
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from unclip_jax.demo import attributes, curves, probe, report, runner, stages
from unclip_jax.demo.profiles import PROFILES
from unclip_jax.input import synthetic
from unclip_jax.pipeline import images as images_lib
from unclip_jax.train.metrics import JsonlWriter


def _ctx(tmp_path, lines=None):
    return runner.Context(tmp_path, PROFILES["fast"], out=(lines.append if lines is not None else None))


def _counting_stage(name, calls, make_file=True):
    def run(ctx):
        calls.append(name)
        files = []
        if make_file:
            p = ctx.path(name, "out.txt")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(name)
            files.append(f"{name}/out.txt")
        ctx.command(f"make {name}")
        return {"files": files, "value": len(calls)}

    return runner.Stage(name, f"stage {name}", run)


def test_resume_skips_finished_stages(tmp_path):
    calls: list[str] = []
    st = [_counting_stage(n, calls) for n in ("a", "b", "c")]
    first = runner.run_stages(_ctx(tmp_path), st)
    assert calls == ["a", "b", "c"]
    assert first["b"]["commands"] == ["make b"] and first["b"]["outputs"] == {"value": 2}
    assert runner.marker_path(tmp_path, "c").is_file()

    lines: list[str] = []
    second = runner.run_stages(_ctx(tmp_path, lines), st)
    assert calls == ["a", "b", "c"]  # nothing re-run
    assert second["a"]["seconds"] == first["a"]["seconds"]
    assert sum("skipping" in s for s in lines) == 3

    # an output that disappeared invalidates its stage only
    (tmp_path / "b" / "out.txt").unlink()
    runner.run_stages(_ctx(tmp_path), st)
    assert calls == ["a", "b", "c", "b"]


def test_resume_with_other_stage_settings_is_refused(tmp_path):
    """A stage whose result depends on a profile setting (the data's scene distribution) will not resume a workdir
    made with another value; markers written before settings were recorded resume as before."""
    calls: list[str] = []
    st = [dataclasses.replace(_counting_stage("data", calls), settings=lambda p: {"scenes": p.scenes})]
    runner.run_stages(runner.Context(tmp_path, dataclasses.replace(PROFILES["fast"], scenes="standard")), st)
    assert json.loads(runner.marker_path(tmp_path, "data").read_text())["settings"] == {"scenes": "standard"}
    other = runner.Context(tmp_path, dataclasses.replace(PROFILES["fast"], scenes="large"))
    with pytest.raises(ValueError, match=r"data.json: stage 'data' was made with \{'scenes': 'standard'\}"):
        runner.run_stages(other, st)
    marker = json.loads(runner.marker_path(tmp_path, "data").read_text())
    del marker["settings"]
    runner.write_marker(tmp_path, "data", marker)
    runner.run_stages(other, st)
    assert calls == ["data"]


def test_interrupted_stage_is_rerun_and_later_stages_wait(tmp_path):
    calls: list[str] = []

    def boom(ctx):
        calls.append("boom")
        raise KeyboardInterrupt

    st = [_counting_stage("a", calls), runner.Stage("b", "b", boom), _counting_stage("c", calls)]
    with pytest.raises(KeyboardInterrupt):
        runner.run_stages(_ctx(tmp_path), st)
    assert not runner.marker_path(tmp_path, "b").exists() and not runner.marker_path(tmp_path, "c").exists()
    st[1] = _counting_stage("b", calls)
    runner.run_stages(_ctx(tmp_path), st)
    assert calls == ["a", "boom", "b", "c"]


def test_train_stage_command_uses_experiment_files_and_overrides(tmp_path, monkeypatch):
    """The train stages go through unclip_jax.main with the profile's experiment variant and overrides."""
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 2  # usage error: the stage must fail loudly

    import unclip_jax.main as main_lib

    monkeypatch.setattr(main_lib, "main", fake_main)
    ctx = _ctx(tmp_path)
    with pytest.raises(RuntimeError, match="decoder failed with exit code 2"):
        stages.stage_decoder(ctx)
    argv = seen["argv"]
    assert "--config=experiments/decoder.py:test" in argv
    assert f"--workdir={tmp_path.resolve() / 'decoder'}" in argv
    assert "--config.total_steps=2" in argv
    assert ctx.commands and ctx.commands[0].startswith("python -m unclip_jax.main --config=experiments/decoder.py:test")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def fake_workdir(tmp_path_factory):
    """A work directory as the stages leave it, written by the real helpers (metrics writer, grids, scorer)."""
    wd = tmp_path_factory.mktemp("demo_report")
    data = synthetic.generate(12, seed=3, sizes=(64,), canvas=256)
    imgs = data["images"][64]

    for stage, base in (("clip", 4.0), ("decoder", 0.3)):
        w = JsonlWriter(str(wd / stage / "metrics.jsonl"))
        for step in range(10, 60, 10):
            w.write_scalars(step, {"train/loss": base / step**0.5, "train/lr": 1e-3})
        w.flush()

    out = wd / "samples"
    images_lib.save_png(images_lib.make_grid(imgs[:6], labels=data["captions"][:6], ncols=3), out / "prompt_grid.png")
    images_lib.save_png(images_lib.make_grid(imgs[6:10], ncols=4), out / "interpolation.png")

    # a perfect "generated" set and a noisy one, scored by the real scorer
    labels = attributes.canonical_labels(data["attributes"])
    noisy = dict(labels)
    noisy["shape_a"] = (labels["shape_a"] + 1) % len(synthetic.SHAPES)
    gen = attributes.score(noisy, data["attributes"], data["captions"])
    real = attributes.score(labels, data["attributes"], data["captions"])

    def ev(ctx):
        ctx.command("evaluate things")
        return {
            "attributes_generated": gen,
            "attributes_real": real,
            "clip_score_generated": {"clip_model": "demo CLIP", "clip_score_raw": 0.21, "clip_score_hessel": 21.0},
            "clip_score_real": {"clip_model": "demo CLIP", "clip_score_raw": 0.3, "clip_score_hessel": 30.0},
            "fid_generated": 123.4,
            "fid_real_same_n": 40.2,
            "fid_num_images": 12,
            "fid_reference_images": 100,
        }

    def train(ctx):
        ctx.command("python -m unclip_jax.main --config=experiments/clip.py:test --workdir=X")
        return {"config": "experiments/clip.py:test", "steps": 50, "final_loss": 0.56}

    runner.run_stages(_ctx(wd), [runner.Stage("clip", "train CLIP", train), runner.Stage("evaluate", "evaluate", ev)])
    return wd, gen


def test_report_is_self_contained_html_with_images_plots_metrics_and_commands(fake_workdir):
    wd, gen = fake_workdir
    path = report.write_report(wd, stage_names=[s.name for s in stages.stages()])
    assert path == wd / "report.html"
    text = path.read_text()
    p = _Collect()
    p.feed(text)
    p.close()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert "table" in p.tags
    # every image is an embedded, decodable PNG: 2 sample grids + 2 loss plots
    assert len(p.imgs) == 4
    sizes = []
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "PNG"
        sizes.append(im.size)
    grid = Image.open(wd / "samples" / "prompt_grid.png")
    assert grid.size in sizes
    body = " ".join(p.text)
    assert "python -m unclip_jax.main --config=experiments/clip.py:test" in body
    assert "not run" in body  # stages without markers are listed as such
    shape = gen["shape"]
    assert shape["correct"] < shape["total"]
    assert f"{100 * shape['accuracy']:.1f}% ({shape['correct']}/{shape['total']})" in body
    assert "100.0%" in body  # the real column
    assert 'src="http' not in text and "src='http" not in text  # nothing external


def test_loss_plot_reads_metrics_rows(fake_workdir):
    wd, _ = fake_workdir
    rows = report.read_metrics(wd / "clip" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20, 30, 40, 50]
    png = base64.b64decode(report.loss_plot(rows, "clip"))
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert report.loss_plot([{"step": 1, "train/lr": 0.1}], "none") is None
    json.dumps(rows)
    assert np.isfinite(rows[0]["train/loss"])


# ------------------------------------------------------------------------------------------------ end to end
def _cheap_fid_features(ctx):
    """Stands in for Inception (minutes on a CPU; its own tests are in test_fid / test_inception): 4x4 colour means."""

    def feats(x, name):
        x = np.asarray(x, np.float32) / 255.0
        n, h, w, _ = x.shape
        return x.reshape(n, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(n, -1)

    return feats


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """``python -m unclip_jax.demo --fast`` in process (Inception replaced), then the same command again."""
    from unclip_jax.demo import __main__ as demo_main

    wd = tmp_path_factory.mktemp("demo_fast") / "wd"
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "fid_features", _cheap_fid_features)
        for _ in range(2):
            buf = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                code = demo_main.main([f"--workdir={wd}", "--fast"])
            outs.append((code, buf.getvalue(), time.perf_counter() - t))
    return wd, outs


@pytest.mark.slow
def test_fast_run_goes_through_every_stage_and_writes_the_report(fast_run):
    wd, [(code, out, _), _] = fast_run
    assert code == 0
    report_path = out.strip().splitlines()[-1]
    assert report_path == str((wd / "report.html").resolve())
    for st in stages.stages():
        assert runner.read_marker(wd, st.name) is not None, st.name
    # the train stages went through unclip_jax.main with the experiment files and exported EMA weights
    for name in ("clip", "prior", "decoder", "upsampler"):
        m = runner.read_marker(wd, name)
        assert m["commands"][0].startswith(f"python -m unclip_jax.main --config=experiments/{name}.py:test ")
        assert (wd / m["outputs"]["export"] / "config.json").is_file()
        assert m["outputs"]["steps"] == 2 and math.isfinite(m["outputs"]["final_loss"])
    assert "[decoder] step 2/2" in out  # progress lines of the train loop
    # the data are the profile's scene distribution, recorded in the data stage's marker
    scenes = PROFILES["fast"].scenes
    assert runner.read_marker(wd, "data")["settings"] == {"scenes": scenes}
    radius = stages.read_set(runner.Context(wd, PROFILES["fast"]), "val_64")["attrs"]["attr/radius"]
    assert set(np.unique(radius[radius > 0]).tolist()) <= set(np.float32(synthetic.SCENES[scenes].radius).tolist())
    ev = runner.read_marker(wd, "evaluate")["outputs"]
    for k in ("colour", "shape", "size", "count"):
        assert 0 <= ev["attributes_generated"][k]["correct"] <= ev["attributes_generated"][k]["total"]
    assert ev["attributes_generated"]["colour"]["total"] > 0
    # the decoder alone on the real images' CLIP embeddings is scored on the same captions
    oracle = ev["attributes_decoder_real_embed"]
    for k in ("colour", "shape", "count"):
        assert oracle[k]["total"] == ev["attributes_generated"][k]["total"]
        assert 0 <= oracle[k]["correct"] <= oracle[k]["total"]
    # which shape is read for which asked-for shape: its diagonal is the shape accuracy, for every image set
    for src, acc in (("generated", "attributes_generated"), ("decoder_real_embed", "attributes_decoder_real_embed")):
        m = np.asarray(ev["shape_confusion"][src])
        assert m.shape == (len(synthetic.SHAPES), len(synthetic.SHAPES) + 1)
        assert np.trace(m) == ev[acc]["shape"]["correct"] and m.sum() == ev[acc]["shape"]["total"]
    assert set(ev["shape_confusion"]) == set(report.SOURCES)
    assert math.isfinite(ev["fid_generated"]) and math.isfinite(ev["clip_score_generated"]["clip_score_raw"])
    with np.load(wd / "samples" / "eval_generated.npz") as z:
        assert z["images"].shape == (PROFILES["fast"].n_eval, 64, 64, 3) and z["images"].dtype == np.uint8
        assert z["decoder_images_real_embed"].shape == z["images"].shape

    text = (wd / "report.html").read_text()
    p = _Collect()
    p.feed(text)
    body = " ".join(p.text)
    # 5 sample figures + 4 training curves + the classifier's curve + diversity plot and grid + accuracy curves
    assert len(p.imgs) == len(report.IMAGES) + len(report.LOSS_STAGES) + 1 + 3
    assert "not run" not in body
    assert "python -m unclip_jax.main --config=experiments/decoder.py:test" in body
    assert "Attribute accuracy" in body and "FID" in body and "decoder given the real z_i" in body
    assert (
        "Background smoothness" in body and "Diversity vs decoder guidance" in body and "Which shape is drawn" in body
    )
    sm = ev["smoothness"]
    g = sm["generated"]
    # Random-ish samples are not flat: noise crosses the object threshold (less background is found than in real
    # images, possibly none: NaN spread) and what background is found is not smooth.
    assert sm["real"]["mean_std"] == 0.0 and g["background_fraction"] < sm["real"]["background_fraction"]
    assert np.isnan(g["mean_std"]) or g["mean_std"] > 0
    np.testing.assert_equal(g["ratio"], g["mean_std"] / max(sm["real"]["mean_std"], sm["floor"]))
    div = runner.read_marker(wd, "diversity")["outputs"]
    fast = PROFILES["fast"]
    assert set(div["table"]) == {"unclip", "caption-only"} and div["n"] == fast.diversity_n
    for by_scale in div["table"].values():
        assert sorted(map(float, by_scale)) == sorted(fast.diversity_scales)
        for v in by_scale.values():
            assert 0 <= v["clip_distance"] <= 2 and 0 <= v["mean_entropy"] <= 1  # n = 2 samples: at most 1 bit
    cur = runner.read_marker(wd, "curves")["outputs"]
    assert [r["step"] for r in cur["decoder"]] == [1, 2] and [r["step"] for r in cur["clip"]] == [1, 2]
    assert all(0 <= r["shape"] <= 1 and 0 <= r["colour"] <= 1 for r in cur["decoder"] + cur["clip"])
    for r in cur["decoder"]:
        assert 0 <= r["shape_real_z"] <= 1 and 0 <= r["colour_real_z"] <= 1
        assert sorted(map(int, r["denoising_mse"])) == list(curves.DENOISE_T)
        assert all(0 < v < 4 for v in r["denoising_mse"].values())  # images and predictions lie in [-1, 1]
    assert (wd / "decoder" / "export" / "ema_1" / "config.json").is_file()
    pr = runner.read_marker(wd, "probe")["outputs"]
    assert pr["n"] == fast.probe_n and set(pr["r2"]) == set(probe.R2_ATTRIBUTES) and pr["r2_images"] > 0
    assert all(0 <= v <= 1 for v in pr["r2"].values())
    assert set(pr["z_probe"]) == set(probe.R2_ATTRIBUTES) and pr["z_probe_images"] > 0
    assert all(set(v) == {"real", "prior"} and all(0 <= a <= 1 for a in v.values()) for v in pr["z_probe"].values())
    assert len(pr["rows"]) == len(probe.PROBE_T) and [r["t0"] for r in pr["rows"]] == sorted(
        r["t0"] for r in pr["rows"]
    )
    for r in pr["rows"]:
        for side in ("own", "other"):
            assert set(r[side]) == set(probe.ATTRIBUTES)
            for k, a in r[side].items():  # both sides scored against the same original images
                assert 0 <= a["correct"] <= a["total"] == r["own"][k]["total"]
        assert r["own"]["colour"]["total"] > 0
    assert "What the decoder reads from z_i" in body and "linear probe, prior's z_i" in body


@pytest.mark.slow
def test_fast_run_resumes_instead_of_starting_over(fast_run):
    wd, [(_, _, first_s), (code, out, second_s)] = fast_run
    assert code == 0
    assert out.count("skipping") == len(stages.stages())
    assert "$ python -m unclip_jax.main" not in out  # nothing trained again
    assert second_s < first_s / 3
    # a work directory of one profile refuses the other
    from unclip_jax.demo import __main__ as demo_main

    assert demo_main.main([f"--workdir={wd}"]) == 2
