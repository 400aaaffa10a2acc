"""The bench: `python -m unclip_jax.bench` end to end on the conv phase (tiny shapes), where the train phases' settings
come from, the diffusers side's pipeline assembly and the report's rows."""

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


def test_train_phases_come_from_the_registry_and_the_bench_experiments(tmp_path):
    """Each train phase is a registry task trained with its experiment's ``bench`` variant at the measured batch."""
    from unclip_jax import stages
    from unclip_jax.bench import PHASES, workloads
    from unclip_jax.train.config_loading import load_experiment

    assert PHASES == ("conv", *workloads.TRAIN_PHASES, "cascade", "export")
    assert set(workloads.TRAIN_PHASES) <= set(stages.TASK_NAMES)
    for phase in workloads.TRAIN_PHASES:
        config = workloads.train_config(phase, tmp_path)
        experiment = load_experiment(f"experiments/{stages.task(phase).experiments[0]}:bench")
        assert config.model.variant == "bench" and config.task.name == phase
        assert config.batch_size == workloads.TRAIN[phase].batch_size
        assert config.optim.to_dict() == experiment.optim.to_dict()
        assert config.diffusion.to_dict() == experiment.diffusion.to_dict()
        batch = workloads.random_batch(config, workloads.network(config))
        assert all(v.shape[0] == config.batch_size for v in batch.values())
    assert workloads.title("decoder").endswith("at 64x64")


def test_torch_side_loads_every_part_of_a_karlo_folder(tmp_path):
    """The diffusers pipeline is assembled from the parts its model_index.json names (text_proj included)."""
    from unclip_jax.bench import torch_jobs
    from unclip_jax.pipeline.testing import random_pipeline, save_diffusers_pipeline

    folder = save_diffusers_pipeline(random_pipeline("test", seed=0), tmp_path / "karlo")
    pipe = torch_jobs.load_unclip_pipeline(folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name, (_, cls_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        assert type(getattr(pipe, name)).__name__ == cls_name, name


def test_report_rows_of_train_steps_cascade_and_conv_ab(tmp_path):
    from unclip_jax.bench import report, workloads

    side = {"seconds": 2.0, "gflops": 50.0, "flops": 1e11, "peak_rss_mb": 100.0, "job_matmul_gflops": 100.0}
    results = {
        "prior": {"jax": {**side, "compile_s": 3.0}, "torch": {**side, "seconds": 4.0}},
        "decoder": {"jax": {"error": "boom"}, "torch": {"error": "not run"}},
        "upsampler": {
            "jax": side,
            "torch": side,
            "conv_ab": {"lax": {"seconds": 1.0, "compile_s": 2.0}, "custom_vjp": {"seconds": 0.5, "compile_s": 2.5}},
        },
        "cascade": {"jax": {"seconds": 10.0}, "torch": {"seconds": 5.0, "flops": 1e12}},
    }
    rep = {
        "date": "d",
        "quick": True,
        "repeats": 1,
        "machine": {"cpu": "c", "cores": 2, "load_avg_at_start": [0.0, 0.0, 0.0]},
        "versions": {"jax": "1"},
        "matmul": {"size": 8, "xla_gflops": 100.0},
        "results": results,
    }
    out = tmp_path / "B.md"
    report.write_report(rep, out)
    md = out.read_text()
    prior_row = next(line for line in md.splitlines() if line.startswith(f"| {workloads.title('prior')} |"))
    assert "| x2.00 |" in prior_row and "| 50% / 50% |" in prior_row
    assert "ours: boom; torch: not run" in md
    cascade_row = next(line for line in md.splitlines() if line.startswith(f"| {workloads.title('cascade')} |"))
    assert "| x0.50 | 100 |" in cascade_row  # our GFLOP/s from torch's FLOP count
    assert "| upsampler | 1.000 | 0.500 | x2.00 | 2.0 / 2.5 |" in md
    assert json.loads(out.with_suffix(".json").read_text()) == rep


def test_export_phase_times_every_format_and_reports_it(tmp_path):
    from unclip_jax.bench.export_jobs import job_export
    from unclip_jax.bench.report import export_section
    from unclip_jax.convert.formats import FORMATS

    res = job_export(tmp_path, 1, variant="test")
    for name in FORMATS:
        assert res[name]["export_s"] > 0 and res[name]["load_run_s"] > 0 and res[name]["size_mb"] > 0
        assert res[name]["max_abs_diff"] < 1e-4
    assert res["reference_max_abs"] > 0.1  # the perturbed weights give a non-trivial output to compare
    md = export_section(res)
    md = "\n".join(md)
    assert "## Export of the `bench` decoder (decoder:test" in md
    assert all(f"| {name} | " in md for name in FORMATS)


def test_report_keeps_dated_sections_of_the_previous_report(tmp_path):
    from unclip_jax.bench import report

    out = tmp_path / "B.md"
    out.write_text("# old\n\n## Training steps\n\nold row\n\n## 2026-12-05 levers\n\n| lever | x |\n")
    machine = {"cpu": "c", "cores": 2, "load_avg_at_start": [0.0, 0.0, 0.0]}
    rep = {"date": "d", "quick": True, "repeats": 1, "machine": machine, "versions": {"jax": "1"}, "results": {}}
    rep["matmul"] = {"size": 8, "xla_gflops": 100.0}
    report.write_report(rep, out)
    md = out.read_text()
    assert md.endswith("## 2026-12-05 levers\n\n| lever | x |\n")
    assert "old row" not in md and md.count("## 2026-12-05 levers") == 1
