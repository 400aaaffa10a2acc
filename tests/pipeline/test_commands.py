"""The sampling commands end to end on a random ``test`` cascade saved as native components: valid PNGs written.

``sample`` goes through the top-level ``unclip`` dispatcher (`unclip_jax.cli.main`), the others through
`unclip_jax.pipeline.commands.main` directly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unclip_jax import cli
from unclip_jax.pipeline import commands, testing


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    testing.save_native_pipeline(testing.random_pipeline("test", seed=4), root / "model")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name)
    return root


FAST = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]
MANIP = ["--decoder-steps", "ddim5", "--stop-after", "decoder"]


def _check_pngs(out, n, capsys):
    printed = capsys.readouterr().out
    assert f"wrote grid {out}" in printed
    singles = sorted(out.parent.glob(f"{out.stem}_image_*.png"))
    assert len(singles) == n
    for p in [out, *singles]:
        with Image.open(p) as im:
            im.verify()
        assert str(p) in printed
    return printed


def test_sample(model_dir, capsys):
    out = model_dir / "s" / "grid.png"
    argv = ["sample", "--model", str(model_dir / "model"), "--prompt", "a red cube", "--prompt", "a dog"]
    assert cli.main([*argv, "--num", "2", "--out", str(out), *FAST]) == 0  # as `unclip sample ...`
    printed = _check_pngs(out, 4, capsys)
    for stage in ("prior", "decoder", "super_res"):
        assert f"[unclip] {stage}: " in printed  # progress per stage
    with Image.open(model_dir / "s" / "grid_image_00.png") as im:
        assert im.size == (32, 32)  # the super-resolution output


def test_vary_interpolate_textdiff(model_dir, capsys):
    m = ["--model", str(model_dir / "model")]
    a, b = str(model_dir / "a.png"), str(model_dir / "b.png")
    out = model_dir / "v" / "vary.png"
    assert commands.main(["vary", a, *m, "--num", "3", "--out", str(out), *MANIP]) == 0
    _check_pngs(out, 3, capsys)
    out = model_dir / "i" / "interp.png"
    assert commands.main(["interpolate", a, b, *m, "--num", "3", "--out", str(out), *MANIP]) == 0
    _check_pngs(out, 3, capsys)
    out = model_dir / "t" / "diff.png"
    argv = ["textdiff", a, *m, "--from", "a photo", "--to", "a photo of a dog", "--thetas", "0,0.25,0.5"]
    assert commands.main([*argv, "--out", str(out), *MANIP]) == 0
    _check_pngs(out, 3, capsys)


def test_missing_component_message(tmp_path):
    with pytest.raises(SystemExit, match="text_encoder: no component found"):  # a message, not a traceback
        commands.main(["sample", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g.png")])
