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


def test_help_lists_the_flags(capsys):
    assert main_lib.main(["unclip train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--mode" in out and "--config.<field>" in out


@pytest.mark.parametrize("folder", ["", "missing"])
def test_bad_data_folder_is_an_error_naming_it(folder, tmp_path, capsys):
    path = "" if not folder else str(tmp_path / folder)
    assert main_lib.main([*BASE, f"--workdir={tmp_path / 'wd'}", f"--config.data.folder={path}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("config.data.folder" in err or path in err), err
