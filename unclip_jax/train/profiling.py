"""What pod users expect of a trainer beyond the step itself: a profiler window, a persistent compilation cache and
model-FLOPs utilisation (MaxText's ``profiler`` / ``jax_cache_dir`` options and its MFU log line).

- :class:`ProfileWindow`: ``--config.profile.start_step=N --config.profile.num_steps=K`` traces steps N+1..N+K with
  ``jax.profiler`` into ``WORKDIR/profile`` (TensorBoard's profile plugin and xprof open it). A window after the
  first steps, not the first: those include compilation and warm-up, which would dominate the trace.
- :func:`enable_compilation_cache`: JAX's persistent cache, so a restarted or preempted job (or the next job of the
  same program) loads the compiled step instead of compiling it again — minutes at the paper's sizes.
- :func:`mfu`: achieved FLOP/s over the devices' published bf16 peak (:mod:`unclip_jax.chips`), the number runs on
  different slices are compared by; None where the device kind has no known peak (CPU, GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from unclip_jax.chips import chip_of_device_kind

log = logging.getLogger(__name__)

DEFAULT_CACHE = "default"  # the config value that means default_cache_dir()


def default_cache_dir(name: str = "xla") -> str:
    """``$XDG_CACHE_HOME/unclip_jax/<name>`` (``~/.cache/unclip_jax/<name>`` when unset): per user, per host."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "unclip_jax", name)


def resolve_cache_dir(value: str) -> str | None:
    """The directory a ``compilation_cache_dir`` config value means: ``"default"`` -> :func:`default_cache_dir`,
    ``""`` -> None (off), anything else -> that path (``~`` expanded)."""
    if not value:
        return None
    return default_cache_dir() if value == DEFAULT_CACHE else os.path.expanduser(value)


def enable_compilation_cache(cache_dir: str, min_compile_time_s: float = 1.0) -> str:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` for compiles taking ``min_compile_time_s`` or more.

    A directory already chosen through JAX's own setting (``JAX_COMPILATION_CACHE_DIR``) wins: the user set it. The
    cache is re-initialised, so this takes effect even after the process has compiled something.

    Returns:
      the directory in use.
    """
    current = jax.config.jax_compilation_cache_dir
    if current and os.path.abspath(current) != os.path.abspath(cache_dir):
        log.info("XLA compilation cache: %s (JAX_COMPILATION_CACHE_DIR)", current)
        return current
    os.makedirs(cache_dir, exist_ok=True)
    jax_cache.set_cache_dir(cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax_cache.reset_cache()
    return cache_dir


@contextlib.contextmanager
def compilation_cache(cache_dir: str, min_compile_time_s: float = 1.0):
    """:func:`enable_compilation_cache` for the ``with`` block, then JAX's previous cache setting again (for
    commands that also run inside other programs and tests)."""
    previous = jax.config.jax_compilation_cache_dir
    previous_time = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        yield enable_compilation_cache(cache_dir, min_compile_time_s)
    finally:
        jax_cache.set_cache_dir(previous)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_time)
        jax_cache.reset_cache()


def peak_flops_per_sec(devices: Sequence[Any]) -> float | None:
    """Sum of the devices' published bf16 peaks (FLOP/s), None when any device kind has no known peak."""
    total = 0.0
    for d in devices:
        chip = chip_of_device_kind(getattr(d, "device_kind", ""))
        if chip is None:
            return None
        total += chip.bf16_tflops * 1e12
    return total or None


def mfu(flops_per_sec: float | None, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: achieved FLOP/s (XLA's count of the step x steps/s) over the peak, or None."""
    if not flops_per_sec or not peak:
        return None
    return float(flops_per_sec) / float(peak)


class ProfileWindow:
    """Traces steps ``start_step + 1 .. start_step + num_steps`` with ``jax.profiler`` into ``logdir``.

    Call :meth:`before_step` with the step about to run and :meth:`after_step` with the step just done (its outputs,
    so the trace ends when they are computed, not when they were dispatched); :meth:`close` ends an open trace (a run
    stopped inside the window). ``start_step < 0`` or ``num_steps <= 0``: off. Only process 0 traces.
    """

    def __init__(self, start_step: int, num_steps: int, logdir: str, primary: bool = True):
        self.start, self.stop = int(start_step), int(start_step) + int(num_steps)
        self.enabled = primary and self.start >= 0 and num_steps > 0
        self.logdir = logdir
        self.active = False

    def before_step(self, step: int) -> None:
        """``step`` is the 0-based index of the step about to run (the loop's step count before it)."""
        if self.enabled and not self.active and self.start <= step < self.stop:
            os.makedirs(self.logdir, exist_ok=True)
            jax.profiler.start_trace(self.logdir)
            self.active = True
            log.info("profiling steps %d-%d into %s", step + 1, self.stop, self.logdir)

    def after_step(self, step: int, outputs: Any = None) -> None:
        """``step`` is the loop's step count after the step (1-based)."""
        if self.active and step >= self.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile written to %s (tensorboard --logdir %s, profile tab)", self.logdir, self.logdir)
