"""`python -m unclip_jax.bench` end to end on the conv phase (tiny shapes): report files and their fields."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_conv_quick_writes_report(tmp_path):
    out = tmp_path / "B.md"
    cmd = [sys.executable, "-m", "unclip_jax.bench", "--quick", "--only", "conv", f"--out={out}"]
    cmd += ["--conv-shapes=2x12x10x16x24", "--matmul-size=256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert {"date", "machine", "versions", "matmul", "results", "repeats"} <= set(report)
    assert report["matmul"]["size"] == 256 and report["matmul"]["xla_gflops"] > 0
    assert report["versions"]["jax"] != "-" and report["versions"]["torch"] != "-"
    (row,) = report["results"]["conv"]["rows"]
    assert row["shape"] == "B2 12x10 16->24"
    assert row["flops"] == 3 * 2 * 2 * 12 * 10 * 16 * 24 * 9
    for impl in ("lax", "custom_vjp", "torch"):
        assert row[impl]["seconds"] > 0
        assert abs(row[impl]["gflops"] - row["flops"] / row[impl]["seconds"] / 1e9) < 1e-6 * row[impl]["gflops"]
    assert report["results"]["conv"]["peak_rss_mb"] > 0
    md = out.read_text()
    assert "custom_vjp vs lax" in md and "B2 12x10 16->24" in md
