"""Config validation: each out-of-domain value is named with its domain; every numeric field has a domain."""

from __future__ import annotations

import fnmatch
import glob
import importlib.util
import os

import pytest

from unclip_jax.train import validate
from unclip_jax.train.config_loading import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
    return load_experiment("experiments/prior.py:test", overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"total_steps": 0}, "config.total_steps=0: expected an integer >= 1"),
        ({"total_steps": -5}, "config.total_steps=-5: expected an integer >= 1"),
        ({"optim.lr": -1e-4}, "config.optim.lr=-0.0001: expected a number >= 0"),
        ({"optim.lr": float("nan")}, "config.optim.lr=nan: expected a number >= 0"),
        ({"optim.b2": 1.0}, "config.optim.b2=1.0: expected a number in [0, 1)"),
        ({"task.drop_text_prob": 1.5}, "config.task.drop_text_prob=1.5: expected a probability in [0, 1]"),
        ({"ema.decay": -0.1}, "config.ema.decay=-0.1: expected a probability in [0, 1]"),
        ({"batch_size": 0}, "config.batch_size=0: expected an integer >= 1"),
        ({"checkpoint.every": 0}, "config.checkpoint.every=0: expected an integer >= 1"),
        ({"mesh.fsdp": 0}, "config.mesh.fsdp=0: expected -1 (all remaining devices) or an integer >= 1"),
        (
            {"optim.schedule": "cosin"},
            "config.optim.schedule='cosin': expected one of ('constant', 'cosine', 'linear')",
        ),
        ({"optim.warmup_steps": 30}, "config.optim.warmup_steps=30: expected <= config.total_steps=20"),
        ({"optim.grad_accum_steps": 3}, "config.optim.grad_accum_steps=3: expected a divisor of config.batch_size=8"),
        ({"data.folder": "/no/such/folder"}, "config.data.folder='/no/such/folder': expected '' or an existing path"),
        ({"init_from": "/no/such/export"}, "config.init_from='/no/such/export': expected '' or an existing path"),
    ],
)
def test_out_of_domain_values_are_named_with_their_domain(overrides, message):
    assert validate.problems(_config(**overrides)) == [message]
    with pytest.raises(
        validate.ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        validate.validate_config(_config(**overrides))


def test_several_problems_are_reported_together():
    err = validate.problems(_config(total_steps=0, **{"optim.lr": -1.0}))
    assert err == ["config.optim.lr=-1.0: expected a number >= 0", "config.total_steps=0: expected an integer >= 1"]


def test_every_numeric_field_of_every_experiment_has_a_domain_and_the_shipped_configs_pass():
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        spec = importlib.util.spec_from_file_location("experiment", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in getattr(module, "VARIANTS", ("test", "paper")):
            config = load_experiment(f"{path}:{arg}")
            flat = validate.flatten(config.to_dict())
            unruled = [
                k
                for k, v in flat.items()
                if isinstance(v, int | float)
                and not isinstance(v, bool)
                and validate.rule_of(k) is None
                and not any(fnmatch.fnmatchcase(k, p) for p in validate.UNCHECKED)
            ]
            assert unruled == [], (path, arg, unruled)
            assert validate.problems(config) == [], (path, arg)


def test_a_field_added_later_is_covered_by_its_name():
    assert validate.rule_of("task.new_drop_prob") is validate.PROB
    assert validate.rule_of("data.other_size") is validate.POS_INT
