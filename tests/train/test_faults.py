"""Fault injection on training (issue 22): damaged checkpoints fall back to the right step and continue bit-exactly,
a second run in a work directory is refused, a resumed config that may not change is named, signals save and flush.

One tiny run (prior ``test``, 6 steps, a checkpoint every 2) is shared by the module; each damage test copies its work
directory. Only the Ctrl-C test runs a subprocess (the exit code must be seen).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax import main as main_lib
from unclip_jax import parallel
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import lock as lock_lib
from unclip_jax.train import loop, metrics, optim, validate
from unclip_jax.train.tasks import make_task

pytestmark = pytest.mark.xdist_group("train_faults")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
COMMON = {"total_steps": STEPS, "log_every": 1, "checkpoint.every": 2, "checkpoint.keep": 3}


class Run:
    """The shared straight run: config, work directory, final params, and the restore target."""

    def __init__(self, config, workdir, params):
        self.config, self.workdir, self.params = config, workdir, params
        mesh, rules = parallel.make_mesh(config.mesh), parallel.logical_rules(config.mesh)
        tx, _ = optim.make_optimizer(config.optim, STEPS)
        batch = parallel.global_batch(data.first_batch(config), mesh)
        abstract, shardings = loop.abstract_state(make_task(config), tx, batch, mesh, rules)
        self.target = ckpt_lib.abstract_with_shardings(abstract, shardings)

    def copy(self, tmp_path) -> str:
        out = str(tmp_path / "run")
        shutil.copytree(self.workdir, out)
        return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    config = data.experiment("prior", **COMMON)
    result = loop.train_and_evaluate(config, workdir)
    assert result.step == STEPS
    return Run(config, workdir, jax.device_get(result.state.params))


def _ckpt(workdir) -> ckpt_lib.Checkpointer:
    return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=2, keep=3)


def _restore(run, workdir, caplog):
    ck = _ckpt(workdir)
    try:
        with caplog.at_level(logging.INFO, logger="unclip_jax.train"):
            return ck.restore_newest_good(run.target)
    finally:
        ck.close()


def _largest_state_file(workdir, step) -> str:
    files = []
    for dirpath, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
        files += [os.path.join(dirpath, n) for n in names]
    return max(files, key=os.path.getsize)


def _damaged_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


def test_every_checkpoint_records_checksums_and_config(run):
    for step in (2, 4, 6):
        meta = json.load(open(os.path.join(run.workdir, "checkpoints", str(step), ckpt_lib.META_FILE)))
        assert meta["step"] == step and meta["config"]["total_steps"] == STEPS
        assert any(k.startswith("state/") for k in meta["files"]) and "data/process_0-of-1.json" in meta["files"]
        assert _ckpt(run.workdir).verify(step) is None


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(4)
        f.seek(-len(b), 1)
        f.write(bytes(x ^ 0xFF for x in b))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("flip", "content differs from its checksum"),
        ("truncate", r"\d+ bytes, \d+ when saved"),
        ("delete", "missing"),
        ("iterator", "content differs from its checksum"),
        ("meta", "unreadable"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, caplog, damage, reason):
    workdir = run.copy(tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    path = {
        "iterator": os.path.join(step_dir, "data", "process_0-of-1.json"),
        "meta": os.path.join(step_dir, ckpt_lib.META_FILE),
    }.get(damage) or _largest_state_file(workdir, 6)
    if damage in ("flip", "iterator"):
        _flip(path)
    elif damage == "truncate":
        _truncate(path)
    elif damage == "delete":
        os.remove(path)
    else:
        open(path, "w").write("{not json")
    step, state = _restore(run, workdir, caplog)
    assert step == 4
    lines = _damaged_lines(caplog)
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"checkpoint step 6 is damaged: {re.escape(path)}: {reason}.*; left in place, falling back to step 4", lines[0]
    ), lines[0]
    assert os.path.isdir(step_dir)  # never deleted
    assert ckpt_lib.non_finite(state, "x") is None


def test_every_checkpoint_damaged_is_a_clear_error(run, tmp_path, caplog):
    workdir = run.copy(tmp_path)
    for step in (2, 4, 6):
        _flip(_largest_state_file(workdir, step))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"no usable checkpoint \(step 6: .*; step 4: .*; step 2: .*\)"):
        _restore(run, workdir, caplog)
    assert [line.split(":")[0] for line in _damaged_lines(caplog)] == [
        f"checkpoint step {s} is damaged" for s in (6, 4, 2)
    ]


def test_non_finite_arrays_in_a_checkpoint_that_verifies_fall_back(run, tmp_path, caplog):
    """A checkpoint saved with NaN params (checksums match what was written) is refused by the finiteness check."""
    workdir = run.copy(tmp_path)
    ck = _ckpt(workdir)
    try:
        _, state = ck.restore(run.target, None, 6)
        bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
        ck.save(8, bad, force=True)
    finally:
        ck.close()
    step, _ = _restore(run, workdir, caplog)
    assert step == 6
    (line,) = _damaged_lines(caplog)
    assert re.search(
        r"checkpoint step 8 is damaged: checkpoint step 8 \(.*\): array \.params.* holds non-finite values", line
    ), line


def test_checkpoint_without_checksums_restores_and_says_so(run, tmp_path, caplog):
    workdir = run.copy(tmp_path)
    os.remove(os.path.join(workdir, "checkpoints", "6", ckpt_lib.META_FILE))
    step, _ = _restore(run, workdir, caplog)
    assert step == 6
    assert (
        "checkpoint step 6 has no checksums (saved before they were recorded, or the run stopped before recording "
        "them): restoring it unverified" in caplog.messages
    )


def test_export_mode_skips_a_damaged_newest_checkpoint(run, tmp_path, caplog):
    workdir = run.copy(tmp_path)
    _flip(_largest_state_file(workdir, 6))
    with caplog.at_level(logging.INFO, logger="unclip_jax.train"):
        out = loop.export_from_checkpoint(run.config, workdir)
    assert out == os.path.join(workdir, "export", "ema_4")
    assert len(_damaged_lines(caplog)) == 1


def test_fallback_continues_bit_exactly_and_keeps_one_metrics_row_per_step(run, tmp_path, caplog):
    workdir = run.copy(tmp_path)
    _flip(_largest_state_file(workdir, 6))
    shutil.rmtree(os.path.join(workdir, "export"))
    os.makedirs(os.path.join(workdir, "export", ".ema.tmp-dead"))  # a killed export's leftover
    with caplog.at_level(logging.INFO, logger="unclip_jax.train"):
        result = loop.train_and_evaluate(run.config, workdir)
    assert result.step == STEPS
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params), run.params)
    rows = [r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert rows == list(range(1, STEPS + 1))
    losses = {
        r["step"]: r["train/loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "step" in r
    }
    ref = {
        r["step"]: r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(run.workdir, "metrics.jsonl"))
        if "step" in r
    }
    assert losses == ref
    kept = os.listdir(os.path.join(workdir, "checkpoints.damaged"))
    assert len(kept) == 1 and kept[0].startswith("6-")  # the damaged folder is kept, not overwritten
    assert _ckpt(workdir).verify(6) is None
    assert os.listdir(os.path.join(workdir, "export")) == ["ema"]
    assert any("removed" in m and ".ema.tmp-dead" in m for m in caplog.messages)


# ----------------------------------------------------------------------------------------------- resume config
def test_resume_with_a_structural_change_lists_the_fields_and_what_to_do(run, tmp_path):
    workdir = run.copy(tmp_path)
    config = data.experiment("prior", **COMMON, **{"optim.grad_clip_norm": 0.0, "optim.weight_decay": 0.1})
    with pytest.raises(validate.ConfigError) as err:
        loop.train_and_evaluate(config, workdir)
    text = str(err.value)
    assert "\n" not in text and len(text) < 800
    assert "optim.grad_clip_norm (checkpoint 1.0, now 0.0), optim.weight_decay (checkpoint 0.06, now 0.1)" in text
    assert "start a new --workdir" in text
    assert "--allow_config_change=optim.grad_clip_norm,optim.weight_decay" in text
    assert "partial_restore" not in text


def test_resume_with_longer_run_and_new_lr_is_allowed(run):
    saved = json.load(open(os.path.join(run.workdir, "checkpoints", "6", ckpt_lib.META_FILE)))["config"]
    changed = run.config.to_dict()
    changed["total_steps"], changed["optim"]["lr"] = 100, 5e-4
    assert validate.resume_changes(saved, changed) == ["optim.lr 0.001 -> 0.0005", "total_steps 6 -> 100"]
    changed["ema"]["decay"] = 0.5
    with pytest.raises(validate.ConfigError, match=r"ema\.decay \(checkpoint 0\.99, now 0\.5\)"):
        validate.resume_changes(saved, changed)
    assert "ema.decay 0.99 -> 0.5" in validate.resume_changes(saved, changed, allow=("ema.decay",))


# ----------------------------------------------------------------------------------------------- signals, lock
def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_ctrl_c_saves_flushes_metrics_and_exits_130_and_a_second_run_is_refused(tmp_path, capsys):
    workdir = str(tmp_path / "sigint")
    log_path = str(tmp_path / "sigint.log")
    cmd = [sys.executable, "-m", "unclip_jax.main", "--config=experiments/prior.py:test", f"--workdir={workdir}"]
    cmd += [f"--config.data.folder={data.shared_embed_folder()}", "--config.total_steps=100000"]
    cmd += ["--config.log_every=100000", "--config.checkpoint.every=100000", "--config.export.at_end=False"]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        t0 = time.time()
        while "compiled the train step" not in open(log_path).read():
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.time() - t0 < 600
            time.sleep(0.2)
        # A second run in the same work directory: one line naming the holder, exit 2, nothing built.
        argv = ["unclip train", "--config=experiments/prior.py:test", f"--workdir={workdir}"]
        assert main_lib.main([*argv, f"--config.data.folder={data.shared_embed_folder()}"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(
            rf"unclip train: error: {re.escape(workdir)} is in use by another run \(host \S+, pid {proc.pid}, "
            r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+\); wait for it to finish.*",
            err,
        ), err
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130, open(log_path).read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(log_path).read()
    assert "Traceback" not in text
    (stop,) = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert f"SIGINT: saved a checkpoint at step {stop}; stopping" in text
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [stop]  # the window in progress is flushed
    assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))


class _SignalAt:
    """A data iterator sending ``signum`` to this process when batch ``at`` is drawn (checkpointable)."""

    def __init__(self, it, at, signum):
        self.it, self.at, self.signum, self.n = it, at, signum, 0

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), self.signum)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def test_sigterm_saves_and_flushes_the_metrics_window_in_progress(tmp_path):
    config = data.experiment("prior", total_steps=50, log_every=20, **{"checkpoint.every": 20})
    workdir = str(tmp_path / "sigterm")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = loop.train_and_evaluate(
        config, workdir, data_iter=_SignalAt(loop.make_train_iterator(config), 4, signal.SIGTERM)
    )
    assert result.preempted and result.signum == signal.SIGTERM and result.step == 3
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [3]
    assert _ckpt(workdir).all_steps() == [3] and _ckpt(workdir).verify(3) is None
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


class _FailAt(_SignalAt):
    """A data iterator whose draw number ``at`` fails (a dying disk)."""

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            raise OSError("input/output error")
        return next(self.it)


def test_an_error_mid_window_still_writes_the_steps_run(tmp_path):
    config = data.experiment("prior", total_steps=50, log_every=20, **{"checkpoint.every": 2})
    workdir = str(tmp_path / "error")
    with pytest.raises(OSError, match="input/output error"):
        loop.train_and_evaluate(config, workdir, data_iter=_FailAt(loop.make_train_iterator(config), 6, 0))
    # draw 1 is the peek; steps 1..4 ran (a checkpoint at 2 and 4), the 6th draw failed
    rows = [r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert rows == [4]
    assert _ckpt(workdir).all_steps() == [2, 4]
    assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK_FILE))  # released on the error
