"""Guidance sweep: one protocol run per (decoder, prior) point sharing one reference; table (md + JSON) and PNG plot.

The generator here is a cheap stand-in (the full cascade runs in tests/evaluate/test_protocol.py): images are the
reference-sized noise fields whose contrast grows with the decoder guidance, so FID changes with guidance and the
sweep's bookkeeping (which scale went where) is checked against separately computed single runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from unclip_jax.evaluate import instruments as instruments_lib
from unclip_jax.evaluate import protocol, sweep
from unclip_jax.evaluate import report as report_lib
from unclip_jax.input import sources

CONFIG = protocol.ProtocolConfig(num_captions=6, seed=1, image_size=32, shard_size=4, batch_size=8, kid_subsets=3)


def _embed_texts(captions):
    out = np.zeros((len(captions), 8), np.float32)
    for i, c in enumerate(captions):
        out[i, len(c) % 8] = 1.0
        out[i, 0] += 0.5
    return out


def _embed_images(images):
    x = np.asarray(images, np.float32) / 255.0
    return np.stack([x[..., c].mean((1, 2)) for c in range(3)] + [x.std((1, 2, 3))] * 5, axis=1)


def make_generator(point):
    g = point["decoder"]

    def fn(captions, seed):
        rng = np.random.default_rng(seed)
        base = rng.uniform(-1, 1, (len(captions), 32, 32, 3))
        return np.clip(127.5 + 127.5 * np.tanh(g * base), 0, 255).astype(np.uint8)

    return protocol.Generator(fn, {"decoder_guidance": g, "prior_guidance": point["prior"]}, {"name": "noise"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append({"file_name": f"im{i}.png", "caption": f"caption {'x' * i}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source_fn = lambda: sources.FolderSource(str(root), image_size=32)  # noqa: E731
    features, ident = instruments_lib.inception_instrument("test")
    inst = protocol.Instruments(features, ident, protocol.ClipScorer("fake clip", _embed_images, _embed_texts))
    return root, source_fn, inst


def test_sweep_over_two_guidance_values_writes_table_and_plot(setup):
    root, source_fn, inst = setup
    points = sweep.sweep_points([1.0, 4.0], [2.0])
    assert points == [{"decoder": 1.0, "prior": 2.0}, {"decoder": 4.0, "prior": 2.0}]
    out = sweep.run_sweep(source_fn, root / "ref", root / "sweep", CONFIG, points, make_generator, inst, progress=False)
    rows = out["rows"]
    assert [r["decoder_guidance"] for r in rows] == [1.0, 4.0]
    # Each row is that point's own protocol run (check against a separate single evaluation at decoder scale 4).
    single = report_lib.evaluate(
        source_fn, root / "ref", root / "single", CONFIG, make_generator(points[1]), inst, progress=False
    )
    assert rows[1]["fid"] == single["results"]["fid"]
    assert rows[1]["clip_score_raw"] == single["results"]["clip_score_raw"]
    assert rows[0]["fid"] != rows[1]["fid"]
    # JSON table.
    table = json.loads(out["paths"]["json"].read_text())
    assert table["rows"] == rows and table["clip_model"] == "fake clip"
    # Markdown table: header + rule + one line per point with the numbers.
    md = out["paths"]["markdown"].read_text().splitlines()
    lines = [ln for ln in md if ln.startswith("|")]
    assert len(lines) == 4 and "FID" in lines[0] and "CLIP score" in lines[0]
    assert f"{rows[1]['fid']:.3f}" in lines[3] and lines[3].startswith("| 4 | 2 |")
    # A valid PNG (decodes, non-trivial size and content).
    png = out["paths"]["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] >= 200 and img.shape[1] >= 400 and img.std() > 5
    # The points share one reference and each point folder has its report.
    assert len(list((root / "ref" / "shards").iterdir())) == CONFIG.num_shards
    for r in rows:
        name = sweep.point_name({"decoder": r["decoder_guidance"], "prior": r["prior_guidance"]})
        report = json.loads((root / "sweep" / "points" / name / "report.json").read_text())
        assert report["results"]["fid"] == r["fid"]


def test_markdown_table_formats_defaults():
    md = sweep.markdown_table([{"decoder_guidance": 1.25, "prior_guidance": None, "fid": 10.391, "num_generated": 3}])
    assert "| 1.25 | default | 10.391 |" in md
