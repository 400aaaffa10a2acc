"""The demo profiles: every stage's overrides are fields of its experiment with the right types."""

from __future__ import annotations

import pytest

from unclip_jax import stages as registry
from unclip_jax.demo.profiles import PROFILES, SHAPE_CLIP
from unclip_jax.input import negatives, synthetic
from unclip_jax.train.config_loading import load_experiment


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_overrides_load_into_their_experiments(name):
    p = PROFILES[name]
    for stage, over in p.overrides.items():
        spec = f"experiments/{registry.task(stage).experiments[0]}:{p.variant}"
        config = load_experiment(spec, over)  # an unknown field or a wrong type raises
        for key, value in over.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, stage, key)
    synthetic.scenes_named(p.scenes)  # a scene distribution the data stage can draw


def test_the_long_profile_trains_the_shape_holding_clip():
    clip = PROFILES["long"].overrides["clip"]
    assert {k: clip[k] for k in SHAPE_CLIP} == SHAPE_CLIP
    assert clip["model.overrides.vision.stem"] == "conv"
    groups = negatives.parse_swaps(clip["data.caption_swaps"])
    assert set(groups[0]) == set(synthetic.SHAPES)
