"""The accuracy-vs-steps curves: which checkpoints are measured, and the plot."""

from __future__ import annotations

import io

from PIL import Image

from unclip_jax.demo import curves


def test_checkpoint_steps_reads_orbax_step_folders(tmp_path):
    assert curves.checkpoint_steps(tmp_path) == []
    for name in ("300", "100", "1000", "tmp_200", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "50").write_text("a file, not a checkpoint")
    assert curves.checkpoint_steps(tmp_path) == [100, 300, 1000]


def test_spread_keeps_the_last_and_spreads_evenly():
    steps = list(range(100, 1700, 100))  # 16 checkpoints
    assert curves.spread(steps, 4) == [100, 600, 1100, 1600]
    assert curves.spread(steps, 1) == [1600]
    assert curves.spread(steps, 0) == steps and curves.spread(steps[:3], 6) == steps[:3]


def test_plot_is_a_png():
    rows = [{"step": 100, "colour": 0.2, "shape": 0.3}, {"step": 200, "colour": 0.5, "shape": 0.4}]
    png = curves.plot(rows, rows[:1])
    assert Image.open(io.BytesIO(png)).format == "PNG"
