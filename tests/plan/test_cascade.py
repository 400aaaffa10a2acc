"""`unclip plan --cascade`: the sampling cascade of the `test` experiments compiled for one TPU chip (libtpu, no TPU):
memory, one step per stage from the difference of prefix programs, and seconds per image from the step counts."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest

from unclip_jax.chips import chip_named
from unclip_jax.plan import cascade, commands, report, table, topology
from unclip_jax.plan.train_step import xla_cost


@pytest.fixture(scope="module")
def cli_cascade(tmp_path_factory):
    """`unclip plan --cascade=test` up to the decoder on one chip of a v5p slice, with --json (two TPU compiles)."""
    tmp = tmp_path_factory.mktemp("cascade")
    out = tmp / "cascade.json"
    argv = ["unclip plan", "--cascade=test", "--topology=v5p:2x2x1", "--stop_after=decoder", "--batch=2"]
    code = commands.main([*argv, f"--json={out}", f"--cache_dir={tmp / 'xla'}"])
    return code, json.loads(out.read_text())


def test_cascade_plan_of_the_test_models_on_one_chip(cli_cascade):
    code, plan = cli_cascade
    assert code == 0 and plan["fits"]
    assert (plan["chip"], plan["device_kind"], plan["batch"], plan["dtype"]) == ("v5p", "TPU v5", 2, "bfloat16")
    assert list(plan["stages"]) == ["prior", "decoder"]
    # Every component's weights are arguments of the program (bfloat16: 2 bytes a parameter).
    assert set(plan["params"]) == {"text_encoder", "prior", "decoder"}
    assert plan["memory"]["argument"] >= 2 * sum(plan["params"].values())
    assert plan["memory"]["used"] >= plan["memory"]["argument"] + plan["memory"]["temp"]
    # The test experiments preview with 8 steps (unclip8): the counts the per-image time multiplies.
    chip = chip_named("v5p")
    for s in plan["stages"].values():
        assert s["steps"] == 8 and s["flops_per_step"] > 0 and s["bytes_per_step"] > 0
        step = max(s["flops_per_step"] / (chip.bf16_tflops * 1e12), s["bytes_per_step"] / (chip.hbm_gbps * 1e9))
        assert math.isclose(s["roofline_s"], s["steps"] * step)
    total = sum(s["roofline_s"] for s in plan["stages"].values())
    assert math.isclose(plan["s_per_image_roofline"], total / 2)
    assert plan["s_per_image_at_mfu"] >= plan["s_per_image_roofline"]
    text = report.format_cascade(plan)
    assert "decoder: 8 steps" in text and "per image" in text


def test_one_decoder_step_costs_the_network_at_the_guidance_batch(cli_cascade):
    """The difference of the prefix programs is one decoder step: its network on 2 x batch rows (classifier-free
    guidance) plus the sampler's elementwise update. The network compiled alone for the same chip costs that."""
    _, plan = cli_cascade
    chip, devices = topology.topology_devices("v5p:2x2x1")
    dec = cascade.load_components("test", "v5p:2x2x1", devices[0], chip, "bfloat16", ["decoder"])["decoder"]
    module, sharding = dec.module, jax.sharding.SingleDeviceSharding(devices[0])
    s, d, b = module.sample_size, module.clip_embeddings_dim, 2 * plan["batch"]
    shapes = ((b, s, s, 3), (b,), (b, d), (b, d), (b, 77, 32))  # x_t, t, z_i, z_t, the test CLIP's caption states
    dtypes = (jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.float32)
    args = [jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for shape, dt in zip(shapes, dtypes, strict=True)]
    cost = xla_cost(jax.jit(module.apply).lower(dec.variables, *args).compile())
    assert plan["stages"]["decoder"]["flops_per_step"] == pytest.approx(cost["flops"], rel=0.05)


def test_a_cascade_variant_some_stage_lacks_is_a_one_line_error(capsys):
    code = commands.main(["unclip plan", "--cascade=nosuch", "--topology=v5p:2x2x1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("unclip plan: --cascade=nosuch: experiments/clip.py:nosuch cannot be loaded")


def test_make_plan_writes_the_serving_table(cli_cascade, tmp_path):
    _, plan = cli_cascade
    row = table.ServingRow("cascade", "test", "v5p:2x2x1", ("--batch=2", "--stop_after=decoder"))
    (tmp_path / f"{row.name}.json").write_text(json.dumps(plan))
    table.write_outputs((), str(tmp_path), str(tmp_path / "PLAN.md"), serving=(row,))
    text = (tmp_path / "PLAN.md").read_text()
    decoder_s = f"{plan['stages']['decoder']['s_at_mfu'] / 2:.2f}"
    assert "| test | v5p:2x2x1 (TPU v5) | 2 | " in text and f"| {decoder_s} |" in text
    assert "unclip plan --cascade=test --topology=v5p:2x2x1 --batch=2 --stop_after=decoder" in text
    assert json.loads((tmp_path / "plan.json").read_text())[0]["stage"] == "cascade"
