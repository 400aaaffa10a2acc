"""A training work directory written by main 03a46a7 (before the stage registry) resumes to the same steps.

``tests/fixtures/legacy_03a46a7/train_prior/`` was written by :func:`write_fixture` run against commit 03a46a7
(``PYTHONPATH=<checkout of 03a46a7> python tests/train/test_legacy.py``): ``experiments/prior.py:test`` trained
through the CLI for 4 steps on the shared train-test data (:func:`test_train_data.shared_embed_folder`) on 8 CPU
devices, checkpointing every 2 steps. The fixture keeps its step-2 checkpoint (``checkpoints/2``: the Orbax
``state`` item and the input iterator's ``data`` item) and ``reference.json``: the metrics that run logged at steps
3 and 4 and the count and sum of the EMA parameters it exported at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.train import test_data as data

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy_03a46a7" / "train_prior"
FLAGS = ("--config.total_steps=4", "--config.log_every=1", "--config.checkpoint.every=2")
RESUMED = (3, 4)  # the steps the resumed run computes
KEYS = ("train/loss", "train/grad_norm", "train/lr")


def _param_stats(folder: str | os.PathLike) -> tuple[int, float]:
    import jax

    from unclip_jax.convert import native

    _, variables = native.load_native(folder)
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(variables["params"])]
    return sum(x.size for x in leaves), float(sum(x.sum() for x in leaves))


@pytest.mark.slow
def test_a_03a46a7_workdir_resumes_to_the_same_steps(tmp_path):
    from unclip_jax.train import loop, metrics

    reference = json.loads((FIXTURE / "reference.json").read_text())
    workdir = tmp_path / "wd"
    shutil.copytree(FIXTURE / "checkpoints", workdir / "checkpoints")
    config = data.experiment("prior", total_steps=4, log_every=1, **{"checkpoint.every": 2})
    result = loop.train_and_evaluate(config, str(workdir))
    assert result.step == 4 and not result.preempted
    rows = {r["step"]: r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "step" in r}
    assert sorted(rows) == list(RESUMED)  # resumed at step 2: steps 1-2 were not trained again
    for step in RESUMED:
        want = reference["metrics"][str(step)]
        np.testing.assert_allclose([rows[step][k] for k in KEYS], [want[k] for k in KEYS], rtol=1e-5, err_msg=step)
    count, total = _param_stats(result.export_dir)
    assert count == reference["ema_param_count"]
    np.testing.assert_allclose(total, reference["ema_param_sum"], rtol=1e-5)


def write_fixture(out: Path = FIXTURE) -> None:
    """Trains 4 steps with the ``unclip_jax`` on ``PYTHONPATH`` (a checkout of 03a46a7) and writes the fixture."""
    import unclip_jax

    code_root = Path(unclip_jax.__file__).resolve().parents[1]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "wd"
        cmd = [sys.executable, "-m", "unclip_jax.main", f"--config={code_root}/experiments/prior.py:test"]
        cmd += [f"--workdir={workdir}", f"--config.data.folder={data.shared_embed_folder()}", *FLAGS]
        subprocess.run(cmd, env=env, cwd=code_root, check=True)
        rows = {
            r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "step" in r
        }
        count, total = _param_stats(workdir / "export" / "ema")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(workdir / "checkpoints" / "2", out / "checkpoints" / "2")
    reference = {
        "metrics": {str(s): {k: rows[s][k] for k in KEYS} for s in RESUMED},
        "ema_param_count": count,
        "ema_param_sum": total,
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_fixture()
