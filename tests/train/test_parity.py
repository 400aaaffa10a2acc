"""Training tracks diffusers/PyTorch step for step (tools/train_parity.py on experiments/{decoder,prior}.py:test).

Same initial weights (exported through the bridge), same batches, timesteps, noise and drop masks (recorded from
our task, replayed in PyTorch), our train step against an independent PyTorch one (loss, AdamW, clipping, warm-up +
cosine, EMA): step 1 loss and gradients agree to 1e-4, and over 20 steps parameters and EMA stay within float noise
without growing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_parity.py"


def _tool():
    spec = importlib.util.spec_from_file_location("train_parity", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.torch
@pytest.mark.parametrize("stage", ["decoder", "prior"])
def test_training_tracks_pytorch(torch_threads, stage):
    tool = _tool()
    result = tool.run_parity(stage, steps=20, log=lambda msg: None)
    print(tool.table(result))
    s1, rows = result["step1"], result["steps"]
    assert s1["loss_rel"] <= 1e-4, s1
    assert s1["grad_max_rel"] <= 1e-4, s1
    assert abs(s1["grad_norm_ours"] - s1["grad_norm_torch"]) <= 1e-4 * s1["grad_norm_torch"]
    # Parameters left out of the maxima have an exact gradient of 0 (rounding noise on both sides).
    assert s1["zero_gradient_norm_ours"] <= 1e-6 * s1["grad_norm_ours"]
    assert s1["zero_gradient_norm_torch"] <= 1e-6 * s1["grad_norm_torch"]
    # Again where every parameter has a gradient (after 20 steps; timesteps include 0 and T-1).
    f = result["final_grads"]
    assert f["loss_rel"] <= 1e-4 and f["grad_max_rel"] <= 1e-4, f
    assert f["params_with_gradient"] == f["param_tensors"]
    assert len(rows) == 20
    for r in rows:
        assert abs(r["lr_ours"] - r["lr_torch"]) <= 1e-6 * max(r["lr_torch"], 1e-12), r
        assert r["loss_rel"] <= 1e-4, r
        assert r["param_max_rel"] <= 3e-4, r
        assert r["ema_max_rel"] <= 3e-4, r
        assert r["update_rel"] <= 1e-4, r
    # Float noise does not compound: the second half of the run is no further apart than the first.
    first, second = rows[:10], rows[10:]
    for key in ("param_max_rel", "ema_max_rel", "update_rel"):
        assert max(r[key] for r in second) <= 2 * max(r[key] for r in first) + 1e-7, key
    # Every part of the recipe ran: warm-up from 0, decay, both drop kinds.
    assert rows[0]["lr_ours"] == 0 and rows[3]["lr_ours"] > rows[-1]["lr_ours"] > 0
    assert all(0 < n < result["draws"]["examples"] for k, n in result["draws"].items() if k.startswith("drop_"))
