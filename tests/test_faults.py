"""Fault injection on the `unclip` command line (issue 22): bad arguments, missing or non-image inputs, unwritable
outputs, config typos and out-of-domain values are one line ``unclip <command>: ...`` with exit code 2 before any work;
non-finite weights and non-finite stage outputs are refused naming the component / stage. The training faults
(checkpoints, lock, signals) are in tests/train/test_faults.py.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

from unclip_jax import cli
from unclip_jax.pipeline import commands, images, loading


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A native pipeline folder (random ``test`` components) whose prior's proj_in kernel holds one NaN."""
    from unclip_jax.convert import native
    from unclip_jax.pipeline.testing import random_pipeline, save_native_pipeline

    folder = save_native_pipeline(random_pipeline("test"), tmp_path_factory.mktemp("nan") / "model")
    module, variables = native.load_native(folder / "prior")
    variables = {k: dict(v) for k, v in variables.items()}
    kernel = np.array(variables["params"]["proj_in"]["kernel"])
    kernel[0, 0] = np.nan
    variables["params"]["proj_in"] = {**variables["params"]["proj_in"], "kernel": kernel}
    native.save_native(module, variables, folder / "prior")
    return folder, kernel.size


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("UNCLIP_TRACEBACK", raising=False)


@pytest.mark.parametrize("num", ["0", "-1", "x"])
def test_num_below_one_is_a_usage_error(num, tmp_path, capsys):
    code, err = _run(["sample", "--model", str(tmp_path), "--prompt", "a", "--num", num], capsys)
    assert code == 2
    got = repr(num) if num == "x" else num
    assert err.splitlines()[-1] == f"unclip sample: error: argument --num: expected an integer >= 1, got {got}"


def test_interpolate_needs_two_points(tmp_path, capsys):
    code, err = _run(["interpolate", "a.png", "b.png", "--model", str(tmp_path), "--num", "1"], capsys)
    assert code == 2 and err.splitlines()[-1].endswith("argument --num: expected an integer >= 2, got 1")


def test_vary_on_a_missing_or_non_image_file(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert _run(["vary", str(missing), "--model", str(tmp_path)], capsys) == (
        2,
        f"unclip vary: {missing}: no such file (UNCLIP_TRACEBACK=1 shows the traceback)",
    )
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, err = _run(["vary", str(text), "--model", str(tmp_path)], capsys)
    assert code == 2 and re.fullmatch(rf"unclip vary: {re.escape(str(text))}: not an image \(.*\) \(UNCLIP.*\)", err)
    assert _run(["vary", str(tmp_path), "--model", str(tmp_path)], capsys)[1].startswith(
        f"unclip vary: {tmp_path}: is a folder, expected an image file"
    )


def test_out_is_checked_before_any_model_loads(tmp_path, capsys):
    """--model points nowhere: were the model loaded first, the error would be about it."""
    base = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "a"]
    assert _run([*base, "--out", str(tmp_path)], capsys) == (
        2,
        f"unclip sample: --out {tmp_path}: is a folder; give a file name such as {tmp_path / 'grid.png'} "
        "(UNCLIP_TRACEBACK=1 shows the traceback)",
    )
    assert _run([*base, "--out", str(tmp_path / "grid.jpg")], capsys)[1].startswith(
        f"unclip sample: --out {tmp_path / 'grid.jpg'}: the output must be a .png file"
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _run([*base, "--out", str(blocker / "grid.png")], capsys)
    assert code == 2 and err.startswith(f"unclip sample: --out {blocker / 'grid.png'}: cannot write there (")
    # A good --out gets past the checks: the missing model is what stops it.
    code, err = _run([*base, "--out", str(tmp_path / "out" / "grid.png")], capsys)
    assert code == 2 and err.startswith("unclip sample: text_encoder: no component found")


def test_traceback_only_with_unclip_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNCLIP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="no such file"):
        cli.main(["vary", str(tmp_path / "nope.png"), "--model", str(tmp_path)])


def test_train_config_typo_and_out_of_domain_values(tmp_path, capsys):
    code, err = _run(["train", "--config=experiments/priorr.py:test", f"--workdir={tmp_path}"], capsys)
    assert (code, err) == (
        2,
        "unclip train: --config=experiments/priorr.py:test: no experiment file 'experiments/priorr.py' "
        "(e.g. experiments/prior.py:test)",
    )
    argv = ["train", "--config=experiments/prior.py:test", f"--workdir={tmp_path / 'wd'}"]
    code, err = _run([*argv, "--config.total_steps=0", "--config.optim.lr=-0.001"], capsys)
    assert code == 2
    assert err == (
        "unclip train: error: config.optim.lr=-0.001: expected a number >= 0; config.total_steps=0: expected an "
        "integer >= 1 (UNCLIP_TRACEBACK=1 shows the traceback)"
    )
    assert not os.path.exists(tmp_path / "wd")  # nothing built, not even the work directory


def test_bench_out_folder_is_checked_first(tmp_path, capsys):
    from unclip_jax.bench import runner

    with pytest.raises(SystemExit) as e:
        runner.main(["--out", str(tmp_path / "missing" / "x.md")])
    assert e.value.code == 2
    assert f"--out {tmp_path / 'missing' / 'x.md'}: the folder {tmp_path / 'missing'} does not exist" in (
        capsys.readouterr().err
    )


def test_non_finite_weights_are_refused_at_load(nan_model, capsys):
    folder, size = nan_model
    with pytest.raises(loading.PipelineLoadError) as err:
        loading.load_component("prior", folder / "prior", own_folder=True)
    assert str(err.value) == (
        f"prior: {folder / 'prior'} holds non-finite weights (params/proj_in/kernel: 1 of {size} values are "
        "NaN/inf); re-export them from a good checkpoint"
    )
    code, err = _run(["sample", "--model", str(folder), "--prompt", "a", "--out", str(folder.parent / "g.png")], capsys)
    assert code == 2
    assert err == f"unclip sample: prior: {folder / 'prior'} holds non-finite weights (params/proj_in/kernel: 1 of " + (
        f"{size} values are NaN/inf); re-export them from a good checkpoint"
    )
    assert not (folder.parent / "g.png").exists()


@pytest.mark.parametrize(
    "key, stage", [("image_embeds", "prior"), ("decoder_images", "decoder"), ("super_res_images", "super_res")]
)
def test_a_non_finite_stage_output_is_refused_naming_the_stage(key, stage, tmp_path):
    result = {k: np.zeros((2, 4), np.float32) for k in ("image_embeds", "decoder_images", "super_res_images")}
    result["images"] = result["super_res_images"]
    result[key] = np.full((2, 4), np.nan, np.float32)
    with pytest.raises(FloatingPointError, match=rf"^the {stage} stage produced 8 non-finite values of 8 \({key}\)"):
        commands._write(result, tmp_path / "g.png", ["a", "b"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_grid_captions_are_wrapped_not_cut():
    measure = len  # one unit per character
    assert images.wrap_label("a photo of an astronaut riding a horse", measure, 12) == [
        "a photo of",
        "an astronaut",
        "riding a...",
    ]
    assert images.wrap_label("supercalifragilistic", measure, 8) == ["supercal", "ifragili", "stic"]
    grid = images.make_grid(np.zeros((2, 64, 64, 3), np.uint8), ["a red cube on a blue table in the sun", "b"])
    assert grid.shape[0] == 2 + 64 + 3 * 14 + 2  # three label lines under the row


def test_leftovers_of_interrupted_exports_are_reported(nan_model, caplog):
    folder, _ = nan_model
    tmp = folder / ".decoder.tmp-abc123"
    tmp.mkdir()
    try:
        with caplog.at_level("WARNING", logger="unclip_jax.pipeline"):
            assert loading.report_leftovers(folder) == [tmp]
        assert caplog.messages == [
            f"{tmp}: left by an interrupted or replaced export; nothing reads it (safe to delete)"
        ]
    finally:
        tmp.rmdir()


def test_no_accelerator_means_no_tpu_probe(tmp_path, monkeypatch):
    """Without a TPU chip or GPU device node JAX is pinned to the CPU (libtpu stays silent); with one it is not. The
    `unclip` entry point and every program's logging set-up (the data/ scripts, training) use the one check."""
    import glob as glob_lib
    import logging

    from unclip_jax import logs

    vendor = tmp_path / "vendor"
    vendor.write_text("0x8086\n")
    monkeypatch.setattr(glob_lib, "glob", lambda pattern: [str(vendor)] if pattern.endswith("/vendor") else [])
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    logs.quiet_accelerator_probe()
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(logging.getLogger("unclip_jax"), "level", logging.getLogger("unclip_jax").level)
    logs.setup_logging()  # what data/*.py call first
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    vendor.write_text("0x1ae0\n")  # a Google TPU chip on the PCI bus
    logs.quiet_accelerator_probe()
    assert "JAX_PLATFORMS" not in os.environ
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    logs.quiet_accelerator_probe()
    assert os.environ["JAX_PLATFORMS"] == "tpu"
    assert cli.quiet_accelerator_probe is logs.quiet_accelerator_probe  # one implementation


# ---------------------------------------------------------------- unclip evaluate / convert: checked before any work
TB = " (UNCLIP_TRACEBACK=1 shows the traceback)"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--num-captions", "1", "expected an integer >= 2, got 1"),
        ("--batch-size", "0", "expected an integer >= 1, got 0"),
        ("--kid-subsets", "-3", "expected an integer >= 1, got -3"),
        ("--candidates", "two", "expected an integer >= 1, got 'two'"),
        ("--inception", "tf", "invalid choice: 'tf' (choose from 'fid_helper', 'pytorch_fid', 'test')"),
    ],
)
def test_evaluate_bad_values_are_usage_errors(flag, value, message, tmp_path, capsys):
    code, err = _run(["evaluate", "--model", str(tmp_path), flag, value], capsys)
    assert code == 2 and err.splitlines()[-1] == f"unclip evaluate: error: argument {flag}: {message}"


def test_evaluate_checks_inputs_and_outputs_before_any_model_loads(tmp_path, capsys):
    """The model folder is empty: had anything been loaded first, the error would be about its missing text encoder."""
    model, blocker = tmp_path / "model", tmp_path / "file"
    model.mkdir()
    blocker.write_text("")
    base = ["evaluate", "--model", str(model), "--out", str(tmp_path / "eval")]
    assert _run(["evaluate", "--model", str(tmp_path / "none")], capsys) == (
        2,
        f"unclip evaluate: --model {tmp_path / 'none'}: no such folder" + TB,
    )
    assert _run([*base, "--decoder", str(blocker)], capsys) == (
        2,
        f"unclip evaluate: --decoder {blocker}: is a file, expected a folder" + TB,
    )
    assert _run([*base, "--clip", str(tmp_path / "clip")], capsys) == (
        2,
        f"unclip evaluate: --clip {tmp_path / 'clip'}: no such folder" + TB,
    )
    assert _run([*base, "--inception", "pytorch_fid"], capsys) == (
        2,
        "unclip evaluate: --inception pytorch_fid needs --inception-weights FILE (pt_inception-2015-12-05-*.pth)" + TB,
    )
    assert _run([*base, "--inception-weights", str(model)], capsys) == (
        2,
        f"unclip evaluate: --inception-weights {model}: is a folder, expected a file" + TB,
    )
    assert _run([*base[:-1], str(blocker)], capsys) == (
        2,
        f"unclip evaluate: --out {blocker}: is a file, expected a folder" + TB,
    )
    assert _run([*base, "--reference-dir", str(blocker / "ref")], capsys) == (
        2,
        f"unclip evaluate: --reference-dir {blocker / 'ref'}: cannot write there ({blocker} is a file, not a folder)"
        + TB,
    )
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = _run([*base[:-1], str(locked / "eval")], capsys)
        assert code == 2 and err.startswith(f"unclip evaluate: --out {locked / 'eval'}: cannot write there (")
    # Good arguments get past the checks: the (empty) model is what stops it.
    code, err = _run([*base, "--prior", "ar"], capsys)
    assert code == 2 and err.startswith("unclip evaluate: text_encoder: no component found")
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_convert_checks_the_destination_before_reading(tmp_path, capsys):
    """The source folder is empty: had it been read first, the error would be its missing config.json (exit 1)."""
    src, blocker = tmp_path / "src", tmp_path / "file"
    src.mkdir()
    blocker.write_text("weights")
    for direction in ("import", "export"):
        base = ["convert", direction, "--component", "prior", str(src)]
        assert _run([*base, str(blocker)], capsys) == (
            2,
            f"unclip convert: destination {blocker}: is a file, expected a folder" + TB,
        )
        assert _run([*base, str(blocker / "out")], capsys) == (
            2,
            f"unclip convert: destination {blocker / 'out'}: cannot write there ({blocker} is a file, not a folder)"
            + TB,
        )
        assert _run([*base, str(tmp_path / "." / "src")], capsys) == (
            2,
            f"unclip convert: destination {tmp_path / 'src'}: is the source folder; give another folder (the source "
            "would be replaced)" + TB,
        )
    assert blocker.read_text() == "weights" and not list(src.iterdir())
    # A good destination gets past the check: reading the empty source is what fails (the converter's exit code 1).
    code = cli.main(["convert", "import", "--component", "prior", str(src), str(tmp_path / "out")])
    assert code == 1 and "config.json: missing" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_plan_json_is_checked_before_the_compile(tmp_path, capsys):
    """A usable config and topology: had the compile run first, the error would come minutes later, after it."""
    from unclip_jax.plan import commands as plan_commands

    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["unclip plan", "--config=experiments/prior.py:test", "--topology=v5p:2x2x1"]
    assert plan_commands.main([*argv, f"--json={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (f"unclip plan: --json {tmp_path}: is a folder, expected a file name")
    assert plan_commands.main([*argv, f"--json={blocker / 'plan.json'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"unclip plan: --json {blocker / 'plan.json'}: cannot write there ({blocker} is a file, not a folder)"
    )


def test_demo_workdirs_are_checked_before_any_stage(tmp_path, capsys):
    from unclip_jax.demo import __main__ as demo_main
    from unclip_jax.demo import inpaint as demo_inpaint

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert demo_main.main(["--workdir", str(blocker), "--fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m unclip_jax.demo: --workdir {blocker}: is a file, expected a folder"
    )
    prog = "python -m unclip_jax.demo.inpaint"
    assert demo_inpaint.main(["--workdir", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"{prog}: --workdir {tmp_path / 'none'}: no such folder"
    assert not (tmp_path / "none").exists()  # not even its inpaint/ folder
    assert demo_inpaint.main(["--workdir", str(tmp_path), "--num", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"{prog}: --num 0 / --finetune-steps 0: expected >= 1 / >= 0"
    assert demo_inpaint.main(["--workdir", str(tmp_path), "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.strip() == f"{prog}: --out {blocker}: is a file, expected a folder"


def _data_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"data_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("make_synthetic", ["--out", "{file}"], "--out {file}: is a file, expected a folder"),
        (
            "make_synthetic",
            ["--out", "{tmp}/s", "--png_dir", "{file}/png"],
            "--png_dir {file}/png: cannot write there ({file} is a file, not a folder)",
        ),  # fmt: skip
        (
            "make_synthetic",
            ["--out", "{tmp}/s", "--scenes", "huge"],
            "argument --scenes: invalid choice: 'huge' (choose from 'standard', 'large')",
        ),  # fmt: skip
        (
            "make_synthetic",
            ["--out", "{tmp}/s", "--num_examples", "0"],
            "--num_examples, --image_size and --shard_size: expected integers >= 1",
        ),  # fmt: skip
        ("precompute_embeddings", ["--src", "{tmp}/none", "--out", "{tmp}/e"], "--src {tmp}/none: no such folder"),
        ("precompute_embeddings", ["--src", "{tmp}", "--out", "{file}"], "--out {file}: is a file, expected a folder"),
        ("prepare_coco", ["--out", "{file}"], "--out {file}: is a file, expected a folder"),
        (
            "prepare_folder",
            ["--root", "{tmp}", "--out", "{file}/x"],
            "--out {file}/x: cannot write there ({file} is a file, not a folder)",
        ),  # fmt: skip
    ],
)
def test_data_scripts_check_their_paths_before_work(script, argv, message, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fill = {"tmp": tmp_path, "file": blocker}
    with pytest.raises(SystemExit) as e:
        _data_script(script)([a.format(**fill) for a in argv])
    assert e.value.code == 2
    prog = os.path.basename(sys.argv[0])  # argparse's program name: the script's, when run as a script
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{prog}: error: {message.format(**fill)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
