"""The training CLI: overrides, and errors that name the field (no training happens here)."""

from __future__ import annotations

import re

import pytest

from unclip_jax import main as main_lib

BASE = ["unclip train", "--config=experiments/prior.py:test"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optim.lrr=1", r"--config\.optim\.lrr=1: unknown field 'config\.optim\.lrr'.*Did you mean \"lr\""),
        ("--config.optim.lr=abc", r"--config\.optim\.lr=abc: could not convert"),
        ("--config.seed=1.5", r"--config\.seed=1\.5"),
        ("--config.mesh.fsdp=3", r"config\.mesh\.data=-1: mesh\.fsdp=3.*does not divide the 8 devices"),
        ("--config.mesh.rules=zero3", r"mesh\.rules: unknown preset 'zero3'"),
    ],
)
def test_bad_overrides_are_errors_naming_the_field(override, message, tmp_path, capsys):
    assert main_lib.main([*BASE, f"--workdir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), (override, err)


def test_usage_without_workdir(capsys):
    assert main_lib.main(BASE) == 2
    assert "--workdir" in capsys.readouterr().err


def test_overrides_reach_the_config():
    fv = main_lib.make_flags([*BASE, "--workdir=x", "--config.optim.lr=0.5", "--config.mesh.fsdp=2"])
    fv([*BASE, "--workdir=x", "--config.optim.lr=0.5", "--config.mesh.fsdp=2"])
    assert fv.config.optim.lr == 0.5 and fv.config.mesh.fsdp == 2 and fv.config.task.name == "prior"
