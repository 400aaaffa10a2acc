"""Measuring tools shared by the bench's jobs: median wall time, FLOP counts, peak memory, the local matmul peak.

Times are medians of ``time.perf_counter`` differences after warm-up; FLOPs are XLA's cost analysis of a compiled
program (ours) and ``torch.utils.flop_counter.FlopCounterMode`` (PyTorch); peak memory is the job process's
``ru_maxrss`` (each job runs in its own process).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

TORCH_THREADS = 2


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(median seconds, every run's seconds) of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every call of each function, the functions called in turn so that load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def block(tree: Any) -> Any:
    """Waits for every array of ``tree`` (JAX dispatch is asynchronous)."""
    import jax

    return jax.block_until_ready(tree)


def local_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """XLA f32 n x n matmul GFLOP/s, measured inside a job (the load of a shared machine drifts between jobs)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    block(dot(a, a))
    med, _ = median_time(lambda: block(dot(a, a)), repeats)
    return 2.0 * n**3 / med / 1e9


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports ``ru_maxrss`` in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def torch_module() -> Any:
    """``torch`` with the bench's thread count and seed."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    return torch


def torch_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` as PyTorch's flop counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of a compiled JAX program from XLA's cost analysis (None when the backend has none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backend without cost analysis
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def timing(med: float, times: list[float], first: float, flops: float | None) -> dict[str, Any]:
    """The fields every timed job reports: median and all seconds, first call, FLOPs and achieved GFLOP/s."""
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "flops": flops,
        "gflops": flops / med / 1e9 if flops else None,
    }


def job_footer() -> dict[str, Any]:
    """Peak memory of the job and the matmul peak measured right after its workload."""
    return {"peak_rss_mb": peak_rss_mb(), "job_matmul_gflops": local_peak_gflops()}
