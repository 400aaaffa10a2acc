"""The loop end to end on the prior `test` experiment: resume after SIGKILL / SIGTERM equals a straight run,
restore onto 2 devices, two processes with jax.distributed agree with one, NaN guard, previews and export.

Subprocesses run the real CLI (``python -m unclip_jax.main``) on 8 (or 2, or 2 x 4) fake CPU devices.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax import parallel
from unclip_jax.convert import native
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import loop, metrics, optim
from unclip_jax.train.tasks import make_task

pytestmark = pytest.mark.xdist_group("train_loop")  # the module fixture (a straight run) is computed once

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 20
COMMON = dict(total_steps=STEPS, log_every=1, **{"checkpoint.every": 10})


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(workdir, *flags, devices=8, mode="train") -> list[str]:
    base = [sys.executable, "-m", "unclip_jax.main", f"--config={ROOT}/experiments/prior.py:test"]
    base += [f"--workdir={workdir}", f"--mode={mode}", f"--config.data.folder={data.shared_embed_folder()}"]
    base += [f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.checkpoint.every=10"]
    return base + list(flags)


def _start(workdir, *flags, devices=8, log=None, mode="train"):
    out = open(log or os.path.join(str(workdir) + ".log"), "w")  # noqa: SIM115
    return subprocess.Popen(
        _cli(workdir, *flags, mode=mode), env=_env(devices), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
    )


def _wait_for(predicate, proc, what, timeout=600):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [r["step"] for r in metrics.read_jsonl(path) if "step" in r] if os.path.exists(path) else []


def _assert_trees_equal(a, b, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0), a, b)


def _restore_params(config, workdir, step):
    mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config.mesh)
    task = make_task(config)
    tx, _ = optim.make_optimizer(config.optim, config.total_steps)
    batch = parallel.global_batch(data.first_batch(config), mesh)
    abstract, shardings = loop.abstract_state(task, tx, batch, mesh, rules)
    ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=10)
    try:
        _, state = ck.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), None, step)
    finally:
        ck.close()
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 steps in one go, in this process (8 devices, mesh (8, 1, 1)); previews every 10 steps."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    # A profiler window over steps 4-5 (unclip_jax.train.profiling).
    config = data.experiment("prior", preview_every=10, **COMMON, **{"profile.start_step": 3, "profile.num_steps": 2})
    result = loop.train_and_evaluate(config, workdir)
    assert result.step == STEPS and not result.preempted
    return config, workdir, jax.device_get(result.state.params)


def test_straight_run_writes_metrics_checkpoints_previews_and_export(straight):
    config, workdir, params = straight
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in (
        "train/loss",
        "train/mse",
        "train/grad_norm",
        "train/param_norm",
        "train/lr",
        "perf/steps_per_sec",
        "perf/examples_per_sec",
        "perf/flops_per_sec",
    ):
        assert key in rows[-1], key
    assert rows[-1]["perf/flops_per_sec"] > 0
    assert "perf/mfu" not in rows[-1]  # CPU devices have no published peak
    assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    preview = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "preview/cosine_to_target" in r]
    assert [r["step"] for r in preview] == [10, 20]
    assert _steps(workdir) == [10, 20]
    assert os.listdir(os.path.join(workdir, "tb"))
    module, variables = native.load_native(os.path.join(workdir, "export", "ema"))
    assert module == make_task(config).module
    np.testing.assert_array_equal(variables["stats"]["clip_std"].shape, (1, 32))
    assert not np.allclose(variables["params"]["proj_in"]["kernel"], params["proj_in"]["kernel"])  # EMA != params


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_equals_straight_run(straight, tmp_path):
    config, straight_dir, straight_params = straight
    workdir = str(tmp_path / "run")
    # 1) SIGKILL once checkpoint 10 is final; the preview at step 11 (a slow first compile) holds the run there.
    p1 = _start(workdir, "--config.preview_every=11")
    _wait_for(lambda: 10 in _steps(workdir), p1, "checkpoint 10")
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    assert _steps(workdir) == [10], _steps(workdir)
    # 2) resume; SIGTERM while the preview of step 13 compiles -> a checkpoint at step 14, exit code 143.
    p2 = _start(workdir, "--config.preview_every=13")
    _wait_for(lambda: 13 in _logged_steps(workdir), p2, "step 13")
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(timeout=600) == 143
    stopped = _steps(workdir)[-1]
    assert 13 <= stopped < STEPS, _steps(workdir)
    np.testing.assert_raises(
        AssertionError, _assert_trees_equal, _restore_params(config, workdir, stopped), straight_params
    )
    # 3) resume to the end.
    p3 = _start(workdir)
    assert p3.wait(timeout=600) == 0, open(workdir + ".log").read()[-3000:]
    assert _steps(workdir)[-1] == STEPS
    _assert_trees_equal(_restore_params(config, workdir, STEPS), straight_params)
    _, ema = native.load_native(os.path.join(workdir, "export", "ema"))
    _, ema_ref = native.load_native(os.path.join(straight_dir, "export", "ema"))
    _assert_trees_equal(ema, ema_ref)
    # The resumed runs saw exactly the batches of the straight run: same losses at every step.
    losses = {
        r["step"]: r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }
    ref = {
        r["step"]: r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(straight_dir, "metrics.jsonl"))
        if "train/loss" in r
    }
    assert losses == ref


def test_checkpoint_from_8_devices_restores_onto_2(straight, tmp_path):
    """`--mode=export` on 2 devices with an fsdp mesh restores the 8-device checkpoint and exports its EMA."""
    _, straight_dir, _ = straight
    out = str(tmp_path / "ema2")
    flags = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.rules=fsdp", f"--export_dir={out}"]
    proc = subprocess.run(
        _cli(straight_dir, *flags, mode="export"), env=_env(2), capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, ema = native.load_native(out)
    _, ema_ref = native.load_native(os.path.join(straight_dir, "export", "ema"))
    _assert_trees_equal(ema, ema_ref)
    # Both exports carry the training diffusion, which is what the pipeline samples with.
    from unclip_jax.pipeline.loading import find_diffusion

    for folder in (out, os.path.join(straight_dir, "export", "ema")):
        d = find_diffusion("prior", Path(folder), None)
        assert d.model_mean_type == "x_start" and d.num_timesteps == 1000, (folder, d.model_mean_type)


class _TwoHosts:
    """What two processes load, in one process: host 0's rows then host 1's (checkpointable)."""

    def __init__(self, config):
        from unclip_jax.input import pipelines

        kw = dict(seed=0, image_size=config.data.image_size, read_threads=1, prefetch_batches=0)
        self.its = [
            iter(
                pipelines.make_pipeline(
                    "prior",
                    config.data.folder,
                    global_batch_size=config.batch_size,
                    process_index=i,
                    process_count=2,
                    **kw,
                )
            )
            for i in range(2)
        ]

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [it.get_state() for it in self.its]

    def set_state(self, state):
        for it, s in zip(self.its, state, strict=True):
            it.set_state(s)


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    steps = 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "two")
    procs = []
    for i in range(2):
        flags = [
            f"--config.total_steps={steps}",
            "--config.checkpoint.every=100",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        cmd = _cli(workdir, *flags)
        procs.append(
            subprocess.Popen(
                cmd,
                env=_env(4),
                stdout=open(f"{workdir}.{i}.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
    rcs = [p.wait(timeout=900) for p in procs]
    assert rcs == [0, 0], open(f"{workdir}.0.log").read()[-3000:] + open(f"{workdir}.1.log").read()[-3000:]

    config = data.experiment("prior", total_steps=steps, log_every=1, **{"checkpoint.every": 100})
    ref_dir = str(tmp_path / "one")
    loop.train_and_evaluate(config, ref_dir, data_iter=_TwoHosts(config))
    rows = {
        r["step"]: r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    }
    ref = {
        r["step"]: r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(ref_dir, "metrics.jsonl"))
        if "train/loss" in r
    }
    assert sorted(rows) == list(range(1, steps + 1))
    np.testing.assert_allclose([rows[k] for k in sorted(rows)], [ref[k] for k in sorted(ref)], rtol=1e-5)
    _, ema = native.load_native(os.path.join(workdir, "export", "ema"))
    _, ema_ref = native.load_native(os.path.join(ref_dir, "export", "ema"))
    _assert_trees_equal(ema, ema_ref, atol=1e-5)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """An lr of 1e30 blows the params up on the first update: loss is finite at step 1, not at step 2."""
    config = data.experiment(
        "prior", total_steps=6, log_every=3, **{"checkpoint.every": 1, "optim.lr": 1e30, "optim.grad_clip_norm": 0.0}
    )
    workdir = str(tmp_path / "nan")
    with pytest.raises(metrics.NonFiniteLossError, match=r"non-finite loss at step (\d)") as err:
        loop.train_and_evaluate(config, workdir)
    bad = err.value.step
    assert bad >= 2
    assert _steps(workdir) == list(range(1, bad))[-3:]  # every step saved up to the last good one (keep=3)
    # The message names the checkpoint a rerun resumes from: the newest one, which verifies.
    good = os.path.join(workdir, "checkpoints", str(bad - 1))
    assert err.value.checkpoint == f"step {bad - 1} ({good})"
    assert f"the newest checkpoint that verifies is step {bad - 1} ({good}), from before it" in str(err.value)
    # The steps before the bad one are in metrics.jsonl (the window in progress is flushed).
    assert _logged_steps(workdir)[-1] == bad - 1
