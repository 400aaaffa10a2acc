"""The trainer's instruments (`unclip_jax.train.profiling`): MFU, the profiler window, the compilation cache."""

from __future__ import annotations

import glob
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.chips import CHIPS
from unclip_jax.train import metrics, profiling
from unclip_jax.train.defaults import apply_test, base_config


def _device(kind: str):
    return types.SimpleNamespace(device_kind=kind)


def test_peak_and_mfu_from_the_chip_table():
    v5p = next(c for c in CHIPS if c.name == "v5p")
    peak = profiling.peak_flops_per_sec([_device(v5p.device_kind)] * 4)
    assert peak == pytest.approx(4 * v5p.bf16_tflops * 1e12)
    # 4 chips at 459 TFLOP/s each; 734.4 TFLOP/s achieved is 40%.
    assert profiling.mfu(0.4 * peak, peak) == pytest.approx(0.4)
    assert profiling.peak_flops_per_sec([_device("cpu")]) is None
    assert profiling.peak_flops_per_sec([_device(v5p.device_kind), _device("NVIDIA H100")]) is None
    assert profiling.mfu(1e12, None) is None and profiling.mfu(None, 1e15) is None


def test_profile_window_traces_exactly_its_steps(tmp_path):
    logdir = str(tmp_path / "profile")
    window = profiling.ProfileWindow(start_step=2, num_steps=2, logdir=logdir)
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.ones((8,))
    active = []
    for step in range(6):
        window.before_step(step)
        active.append(window.active)
        x = f(x)
        window.after_step(step + 1, x)
    window.close()
    # Steps 3 and 4 (0-based 2 and 3) ran inside the trace, and nothing else.
    assert active == [False, False, True, True, False, False]
    assert glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)


def test_profile_window_off_and_on_other_processes(tmp_path):
    for window in (
        profiling.ProfileWindow(-1, 3, str(tmp_path / "a")),
        profiling.ProfileWindow(0, 0, str(tmp_path / "b")),
        profiling.ProfileWindow(0, 3, str(tmp_path / "c"), primary=False),
    ):
        window.before_step(0)
        assert not window.active
    assert not os.listdir(tmp_path)


def test_compilation_cache_stores_a_compiled_program(tmp_path):
    cache = str(tmp_path / "xla")
    before = jax.config.jax_compilation_cache_dir
    assert not before, "tests run without a persistent cache (a test left one on)"
    with profiling.compilation_cache(cache, min_compile_time_s=0.0) as used:
        assert used == cache and jax.config.jax_compilation_cache_dir == cache
        seed = float(np.random.default_rng().uniform())  # a program no earlier test compiled
        jax.jit(lambda x: jnp.cos(x) + seed)(jnp.ones((3, 5))).block_until_ready()
        assert os.listdir(cache), "the compiled program is in the cache"
    assert not jax.config.jax_compilation_cache_dir  # the previous setting (none) is back


def test_cache_dir_values(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profiling.resolve_cache_dir("default") == str(tmp_path / "unclip_jax" / "xla")
    assert profiling.resolve_cache_dir("") is None
    assert profiling.resolve_cache_dir("~/x") == os.path.expanduser("~/x")
    # On by default in every experiment, off in the test presets.
    assert base_config("decoder").compilation_cache_dir == "default"
    assert apply_test(base_config("decoder")).compilation_cache_dir == ""
    assert base_config("prior").profile.start_step == -1


def test_progress_reports_mfu_against_the_peak(monkeypatch):
    clock = iter([100.0, 102.0, 200.0, 201.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    progress = metrics.Progress(100, 0, 8, flops_per_step=2e12, peak_flops_per_sec=1e13)
    out = progress.update(4)  # 4 steps in 2 s: 2 steps/s x 2 TFLOP = 4 TFLOP/s of 10
    assert out["perf/mfu"] == pytest.approx(0.4)
    assert "MFU 40.0%" in progress.line(4, out)
    assert "perf/mfu" not in metrics.Progress(100, 0, 8, 2e12).update(1)
