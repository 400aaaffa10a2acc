"""`unclip plan`: a `test` variant's train step compiled for a small TPU slice (libtpu, no TPU), the fsdp bound on
8 chips and its failure when a sharding rule is removed, and the one-line errors of bad inputs."""

from __future__ import annotations

import json
import math
import os

import pytest

from unclip_jax.chips import CHIPS, chip_of_device_kind
from unclip_jax.plan import commands, report, topology
from unclip_jax.plan.train_step import FSDP_SLACK, layout
from unclip_jax.train.config_loading import load_experiment

FSDP = {"mesh.rules": "fsdp", "mesh.data": 1, "mesh.fsdp": -1}


@pytest.fixture(scope="module")
def v5p_8():
    return topology.topology_devices("v5p:2x2x2")


@pytest.fixture(scope="module")
def cli_plan(tmp_path_factory):
    """`unclip plan` of experiments/prior.py:test on a 4-chip v5p slice, with --json (one real TPU compile)."""
    tmp = tmp_path_factory.mktemp("plan")
    out = tmp / "plan.json"
    argv = ["unclip plan", "--config=experiments/prior.py:test", "--topology=v5p:2x2x1", f"--json={out}"]
    code = commands.main([*argv, f"--cache_dir={tmp / 'xla'}", "--config.batch_size=16"])
    return code, json.loads(out.read_text())


def test_plan_of_a_test_variant_compiles_for_a_tpu_slice_with_sane_numbers(cli_plan):
    code, plan = cli_plan
    assert code == 0
    assert (plan["chips"], plan["chip"], plan["device_kind"]) == (4, "v5p", "TPU v5")
    assert plan["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and plan["rules"] == "data"
    assert plan["overrides"] == ["--config.batch_size=16"] and plan["batch_size"] == 16
    # Data parallel: every chip holds the whole state and a quarter of the batch.
    total, chip = plan["bytes_total"], plan["bytes_per_chip"]
    assert plan["parameters"] > 0 and total["params"] == 4 * plan["parameters"]  # float32
    assert chip["params"] == total["params"] and chip["ema"] == total["ema"]
    assert chip["opt_state"] >= 2 * total["params"]  # AdamW mu and nu
    assert chip["batch"] == total["batch"] // 4
    # The compiled TPU program holds at least its arguments (state + batch shard) and uses far less than the HBM.
    m = plan["memory"]
    assert m["argument"] >= chip["params"] + chip["opt_state"] + chip["ema"] + chip["batch"]
    assert m["alias"] > 0  # the state is donated
    assert 0 < m["used"] < 0.01 * plan["hbm_bytes"] and plan["fits"] and plan["fsdp_check"]["ok"]
    # A forward + backward costs at least 2 x 3 FLOPs per parameter and example (4 of 16 examples per chip).
    assert plan["flops_per_chip"] >= 6 * plan["parameters"] * 4
    r = plan["roofline"]
    assert r["step_s"] == max(r["compute_s"], r["memory_s"]) > 0
    chip_spec = chip_of_device_kind("TPU v5")
    assert math.isclose(r["compute_s"], plan["flops_per_chip"] / (chip_spec.bf16_tflops * 1e12))
    assert math.isclose(plan["days_at_mfu"], plan["step_s_at_mfu"] * plan["total_steps"] / 86400)
    assert math.isclose(plan["step_s_at_mfu"], max(r["compute_s"] / 0.4, r["step_s"]))  # never beats the roofline
    # What the compile needed of this host: more than the JAX runtime alone, less than the machine.
    assert 0.2 < plan["host_peak_gib"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def test_report_says_what_fits(cli_plan):
    text = report.format_train(cli_plan[1])
    assert text.startswith("prior:test on v5p:2x2x1: 4 x TPU v5 (v5p, 95 GiB HBM)")
    assert "fits with >= 10% headroom" in text and "fsdp bound" in text and "days for 20 steps" in text
    assert f"peak host memory {cli_plan[1]['host_peak_gib']:.1f} GiB" in text


@pytest.mark.parametrize("experiment", ["decoder", "upsampler", "clip", "ar_prior"])
def test_fsdp_rules_shard_the_state_on_8_chips_and_the_check_fails_without_a_rule(experiment, v5p_8):
    chip, devices = v5p_8
    config = load_experiment(f"experiments/{experiment}.py:test", FSDP)
    check = layout(config, "v5p:2x2x2", devices, chip).fsdp_check()
    assert check["shard_ways"] == 8
    assert check["state_per_chip"] <= FSDP_SLACK * check["state_total"] / 8, check["largest_replicated"]
    assert check["ok"]
    # Without the rule that splits model widths (`embed`) over fsdp, the big kernels stay whole on every chip.
    config = load_experiment(f"experiments/{experiment}.py:test", {**FSDP, "mesh.rules_override": (("embed", None),)})
    broken = layout(config, "v5p:2x2x2", devices, chip).fsdp_check()
    assert not broken["ok"] and broken["state_per_chip"] > check["state_per_chip"]
    assert broken["largest_replicated"][0]["bytes"] > 0


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9z:2x2", "unknown chip 'v9z'"),
        ("bogus", "expected <chip>:<shape>"),
        ("v5p:3x3x3", "libtpu rejects it"),
    ],
)
def test_a_bad_topology_is_a_one_line_error(name, message, capsys):
    with pytest.raises(topology.PlanError, match=message) as e:
        topology.topology_devices(name)
    assert "\n" not in str(e.value)
    code = commands.main(["unclip plan", "--config=experiments/prior.py:test", f"--topology={name}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("unclip plan: ") and "\n" not in err and message in err


def test_a_mesh_that_does_not_match_the_chips_is_a_one_line_error(capsys):
    argv = ["unclip plan", "--config=experiments/prior.py:test", "--topology=v5p:2x2x1", "--config.mesh.data=3"]
    assert commands.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip plan: v5p:2x2x1 has 4 chips: config.mesh") and "\n" not in err
    assert "-1" in err  # says what to do


def test_missing_libtpu_is_a_one_line_error_that_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(topology.PlanError, match=r"pip install -e '\.\[tpu\]'"):
        topology.topology_devices("v5p:2x2x1")
    assert commands.main(["unclip plan", "--config=experiments/prior.py:test", "--topology=v5p:2x2x1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "libtpu is not installed" in err and "\n" not in err


def test_the_chip_table_knows_every_generation_libtpu_describes():
    assert [c.name for c in CHIPS] == ["v4", "v5e", "v5p", "v6e"]
    for name, kind in (("v5e:2x2", "TPU v5 lite"), ("v6e:2x2", "TPU v6 lite"), ("v4:2x2x1", "TPU v4")):
        chip, devices = topology.topology_devices(name)
        assert devices[0].device_kind == kind and chip_of_device_kind(kind) is chip and len(devices) == 4


def test_layout_only_plan_reports_the_fsdp_failure_and_exits_1(tmp_path, capsys):
    """`--nocompile` lays the step out in seconds; a removed sharding rule shows as the failed bound (exit code 1)."""
    out = tmp_path / "layout.json"
    argv = ["unclip plan", "--config=experiments/decoder.py:test", "--topology=v5p:2x2x2", "--nocompile"]
    fsdp = ["--config.mesh.rules=fsdp", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    assert commands.main([*argv, *fsdp, f"--json={out}"]) == 0
    plan = json.loads(out.read_text())
    assert not plan["compiled"] and plan["mesh"]["fsdp"] == 8 and plan["fsdp_check"]["ok"]
    capsys.readouterr()
    assert commands.main([*argv, *fsdp, "--config.mesh.rules_override=(('embed', None),)"]) == 1
    text = capsys.readouterr().out
    assert "FAILS (replicated by accident?)" in text and "replicated: " in text and "not compiled" in text


def test_unet_activations_are_split_over_the_batch_axes_on_every_chip():
    """fsdp on 8 devices: no large value of the compiled upsampler train step holds all 40 examples on one chip."""
    import jax

    from unclip_jax.chips import chip_named
    from unclip_jax.plan import hlo
    from unclip_jax.plan.train_step import compile_layout

    config = load_experiment("experiments/upsampler.py:test", {**FSDP, "batch_size": 40})
    lay = layout(config, "cpu:8", jax.devices()[:8], chip_named("v5p"))
    assert dict(hlo.full_batch_values(compile_layout(lay).as_text(), 40)) == {}


def test_a_step_that_does_not_fit_is_the_compilers_verdict_in_one_line_and_in_the_json(tmp_path, capsys):
    """XLA's TPU compiler refuses a program larger than the HBM (RESOURCE_EXHAUSTED): exit 1, not a traceback."""
    out = tmp_path / "plan.json"
    argv = ["unclip plan", "--config=experiments/prior.py:test", "--topology=v5e:2x2", "--config.batch_size=1048576"]
    assert commands.main([*argv, f"--json={out}", f"--cache_dir={tmp_path / 'xla'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip plan: the train step on v5e:2x2 does not fit: XLA's TPU compiler says: ")
    assert "\n" not in err and "HBM" in err
    plan = json.loads(out.read_text())
    assert plan["fits"] is False and plan["error"] == err.removeprefix("unclip plan: ")
    assert topology.DoesNotFit.check(RuntimeError("INVALID_ARGUMENT: bad shape"), "x") is None  # others propagate
