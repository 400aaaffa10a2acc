"""The demo's inpainting measurement (demo/inpaint.py): its cases hide exactly one object in the hole of the mask,
and the report table says both methods with their step counts."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.demo.inpaint import format_report, inpaint_cases, main
from unclip_jax.input import synthetic


@pytest.mark.parametrize("scenes", sorted(synthetic.SCENES))
def test_cases_are_empty_scenes_with_the_object_inside_the_hole(scenes):
    c = inpaint_cases(12, 64, scenes=scenes)
    radius = np.float32([synthetic.SCENES[scenes].radius[k] for k in c["attrs"]["attr/size"][:, 0]])
    np.testing.assert_array_equal(c["attrs"]["attr/radius"][:, 0], radius)  # the cases are of that distribution
    assert c["source"].shape == (12, 64, 64, 3) and c["mask"].shape == (12, 64, 64, 1)
    assert set(np.unique(c["mask"])) == {0.0, 1.0} and np.all(c["attrs"]["attr/num_objects"] == 1)
    full = c["full"].astype(np.float32) / 127.5 - 1.0
    differs = np.abs(full - c["source"]).max(-1) > 1e-6  # where the object is
    hole = c["mask"][..., 0] < 0.5
    assert not (differs & ~hole).any()  # the whole object lies in the hole ...
    assert np.all((differs & hole).sum((1, 2)) > 20)  # ... and the source shows none of it
    for cap, colour in zip(c["captions"], c["attrs"]["attr/colour"][:, 0], strict=True):
        assert synthetic.COLOUR_NAMES[colour] in cap  # the prompt names the colour that is scored


def test_report_table():
    row = dict(colour=dict(accuracy=0.9, correct=9, total=10), shape=dict(accuracy=0.5), seconds=3.0)
    report = dict(
        num_cases=10,
        size=128,
        target=0.8,
        repaint={**row, "decoder_steps": 25, "decoder_network_calls": 105, "jump_length": 5, "jump_n_sample": 5},
        model={**row, "decoder_steps": 6, "decoder_network_calls": 6},
    )
    text = format_report(report)
    assert "decoder guidance" not in text  # a report without the scale does not invent one
    with_scale = format_report({**report, "decoder_guidance": 8.0})
    assert with_scale.splitlines()[0].endswith("target: colour >= 80%); decoder guidance 8")
    assert "| demo decoder + RePaint | 25 (jumps 5 x 5) | 105 | 0.900 (9/10) | 0.500 | 3.0 |" in text
    assert "| GLIDE inpainting fine-tune | 6 | 6 | 0.900 (9/10)" in text


def test_negative_guidance_scale_is_a_usage_error_before_any_model_loads(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--guidance-scale", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "python -m unclip_jax.demo.inpaint: --guidance-scale -1.0: expected >= 0"
    assert not (tmp_path / "inpaint").exists()
