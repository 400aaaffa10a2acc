"""Micro-benchmarks: the f32 matmul peak of the machine and the 3x3 convolution forward + backward.

The matmul peak (XLA, numpy, PyTorch) is what the GFLOP/s figures of the other jobs are compared with. The conv
job times one 3x3 'same' convolution with its input and weight gradients (a vjp) through ``lax`` autodiff, through
our ``custom_vjp`` (:mod:`unclip_jax.layers.conv`) and through PyTorch, interleaved in one process.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from unclip_jax.bench.measure import block, interleaved_times, local_peak_gflops, median_time, peak_rss_mb, torch_module

CONV_SHAPES = "8x64x64x128x128,8x64x64x64x64,8x32x32x128x128"  # B x H x W x Cin x Cout
MATMUL_N = 2048
# The driver passes the command line's sizes to the job subprocesses through these.
CONV_SHAPES_ENV = "UNCLIP_BENCH_CONV_SHAPES"
MATMUL_N_ENV = "UNCLIP_BENCH_MATMUL_N"


def job_matmul(workdir: Path, repeats: int) -> dict[str, Any]:
    """f32 n x n matmul: XLA (the peak the GFLOP/s figures are compared with), numpy, torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = int(os.environ.get(MATMUL_N_ENV, MATMUL_N))
    flops = 2.0 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    block(dot(ja, jb))
    t_xla, _ = median_time(lambda: block(dot(ja, jb)), max(repeats, 5))
    a @ b
    t_np, _ = median_time(lambda: a @ b, max(repeats, 5))
    torch = torch_module()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    t_torch, _ = median_time(lambda: ta @ tb, max(repeats, 5))
    return {
        "size": n,
        "xla_gflops": flops / t_xla / 1e9,
        "numpy_gflops": flops / t_np / 1e9,
        "torch_gflops": flops / t_torch / 1e9,
        "peak_rss_mb": peak_rss_mb(),
        "job_matmul_gflops": local_peak_gflops(),
    }


def parse_shapes(shapes: str) -> list[tuple[int, ...]]:
    """``"BxHxWxCinxCout,..."`` -> [(B, H, W, Cin, Cout), ...]."""
    return [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]


def job_conv(workdir: Path, repeats: int) -> dict[str, Any]:
    """3x3 'same' conv, forward + input grad + weight grad (vjp), lax autodiff vs custom_vjp vs torch."""
    import jax
    import numpy as np

    from unclip_jax.layers.conv import conv2d_same

    torch = torch_module()
    rows = []
    for b, h, w, cin, cout in parse_shapes(os.environ.get(CONV_SHAPES_ENV, CONV_SHAPES)):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, h, w, cin), dtype=np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        g = rng.standard_normal((b, h, w, cout), dtype=np.float32)
        flops = 3 * 2.0 * b * h * w * cin * cout * 9  # forward + two backward convolutions
        row: dict[str, Any] = {"shape": f"B{b} {h}x{w} {cin}->{cout}", "flops": flops}
        fns = {}
        for impl in ("lax", "custom_vjp"):

            def fwd_bwd(x, k, g, impl=impl):
                y, vjp = jax.vjp(lambda x, k: conv2d_same(x, k, impl=impl), x, k)
                return y, vjp(g)

            jitted = jax.jit(fwd_bwd)
            block(jitted(x, k, g))
            fns[impl] = lambda jitted=jitted, x=x, k=k, g=g: block(jitted(x, k, g))
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

        def torch_step(tx=tx, tk=tk, tg=tg):
            tx.grad = tk.grad = None
            y = torch.nn.functional.conv2d(tx, tk, padding=1)
            y.backward(tg)

        torch_step()
        fns["torch"] = torch_step
        for name, ts in interleaved_times(fns, repeats).items():
            med = statistics.median(ts)
            row[name] = {"seconds": med, "gflops": flops / med / 1e9}
        rows.append(row)
    return {"rows": rows, "peak_rss_mb": peak_rss_mb()}
