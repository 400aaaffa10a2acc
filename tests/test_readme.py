"""The README's commands work as written (issue 10: "every command in it works as written").

Every command of the README's fenced ``bash`` blocks is checked against the code that runs it:

- ``unclip train`` / ``python -m unclip_jax.main``: the absl flags are parsed for real (the experiment file is
  loaded, the variant built, every ``--config.<field>=value`` override applied), without training;
- the argparse programs (``unclip sample|vary|interpolate|textdiff|evaluate|convert``, ``data/*.py``,
  ``python -m unclip_jax.bench``): their own parser parses the command (flags, types, choices, required
  arguments) and the program stops right after parsing;
- ``make`` targets and variables exist in the Makefile; ``pip install`` pins are the Makefile's;
- the cheap ones run in a subprocess and must exit 0: every ``--help``, ``python -c``, and the built-in
  dataset script with at most 1,000 examples (``workdirs/`` redirected to a temporary folder).

Also: every ``--flag`` written anywhere in the README exists in some parser; every ``--config.<field>`` exists
in the experiment configs; every ``experiments/X.py:variant`` exists; the Python blocks import only names that
exist; the package layout block matches ``unclip_jax/``; local links and anchors resolve.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv the tests run in (.venv/bin)
TEXT = README.read_text()

UNCLIP_ARGPARSE = ("sample", "vary", "interpolate", "textdiff", "evaluate", "convert", "inpaint")
PYTHON_MODULES = {
    "unclip_jax.bench": "unclip_jax.bench",
    "unclip_jax.demo": "unclip_jax.demo.__main__",
    "unclip_jax.demo.inpaint": "unclip_jax.demo.inpaint",
}
# Flags of tools that are not ours (pip, pytest, ruff, gcloud, TensorBoard, pytorch-fid).
EXTERNAL_FLAGS = {"--no-deps", "--worker", "--command", "--logdir", "--save-stats", "--dist", "--check"}


# ----------------------------------------------------------------------------------------------------- extraction
def blocks(lang: str) -> list[str]:
    """Contents of the fenced blocks whose info string is ``lang`` ('' = no language)."""
    out, current, info = [], None, ""
    for line in TEXT.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == lang:
                    out.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return out


def commands() -> list[list[str]]:
    """Simple commands of the bash blocks: continuation lines joined, comments dropped, split at ; & | and
    loop keywords, leading ``VAR=value`` kept (so runs see them)."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lex.whitespace_split = True
            seg: list[str] = []
            for tok in [*lex, ";"]:
                if tok and set(tok) <= set(";&|"):
                    if seg and seg[0] not in ("for", "done", "wait"):
                        out.append(seg[1:] if seg[0] == "do" else seg)
                    seg = []
                else:
                    seg.append(tok)
    return out


def split_env(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
        k, v = cmd[0].split("=", 1)
        env[k] = v
        cmd = cmd[1:]
    return env, [a.replace("$i", "0") for a in cmd]


def program(argv: list[str]) -> str:
    """A short name of what runs: 'unclip sample', 'data/prepare_folder.py', 'python -m unclip_jax.bench', ..."""
    exe = Path(argv[0]).name
    if exe == "unclip":
        return f"unclip {argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else "unclip"
    if exe in ("python", "python3"):
        if argv[1] == "-m":
            return f"python -m {argv[2]}"
        if argv[1] == "-c":
            return "python -c"
        return argv[1]
    return exe


ALL = [split_env(c) for c in commands()]


def _id(cmd: list[str]) -> str:
    return " ".join(cmd)[:70]


# ----------------------------------------------------------------------------------------------------- parsing
class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.parser, self.namespace = parser, namespace


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argparse_entry(argv: list[str]):
    """(main function, its argv) of an argparse program of the README, or None."""
    prog = program(argv)
    if prog.startswith("unclip ") and argv[1] in UNCLIP_ARGPARSE:
        from unclip_jax import cli

        return cli.main, argv[1:]
    if prog.startswith(("data/", "tools/")) and prog.endswith(".py"):
        return _load_script(ROOT / prog).main, argv[2:]
    if prog.startswith("python -m ") and argv[2] in PYTHON_MODULES:
        return importlib.import_module(PYTHON_MODULES[argv[2]]).main, argv[3:]
    return None


def parse_argparse(entry, argv: list[str], monkeypatch) -> _Parsed:
    """Runs ``entry(argv)`` until its parser has parsed ``argv`` (parse_args is wrapped to stop there)."""
    original = argparse.ArgumentParser.parse_args

    def stop_after_parse(self, args=None, namespace=None):
        raise _Parsed(self, original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop_after_parse)
        try:
            entry(list(argv))
        except _Parsed as p:
            return p
        except SystemExit as e:  # argparse.error: the message went to stderr
            pytest.fail(f"{argv}: the parser rejected it (exit {e.code})")
    pytest.fail(f"{argv}: the program returned without parsing its arguments")


def parse_train(argv: list[str], monkeypatch):
    """absl parsing of ``unclip train ...`` / ``python -m unclip_jax.main ...``; returns the FlagValues."""
    from unclip_jax import main as main_lib

    rest = argv[2:] if program(argv) == "unclip train" else argv[3:]
    flag_argv = ["unclip train", *rest]
    monkeypatch.chdir(ROOT)  # experiments/ paths are relative to the repository
    fv = main_lib.make_flags(flag_argv)
    fv(flag_argv)
    return fv


# ----------------------------------------------------------------------------------------------------- tests
def test_the_readme_has_commands_of_every_kind():
    progs = {program(c) for _, c in ALL}
    for want in ("unclip train", "unclip sample", "unclip vary", "unclip interpolate", "unclip textdiff"):
        assert want in progs, want
    assert {"unclip evaluate", "unclip convert", "data/prepare_folder.py", "data/precompute_embeddings.py"} <= progs


@pytest.mark.parametrize("env, argv", ALL, ids=[f"{i:02d} {_id(c)}" for i, (_, c) in enumerate(ALL)])
def test_command_is_accepted_by_its_program(env, argv, monkeypatch):
    prog = program(argv)
    if argv[-1] in ("--help", "-h") or prog == "python -c":
        return  # run by test_cheap_commands_run
    if prog in ("unclip train", "python -m unclip_jax.main"):
        fv = parse_train(argv, monkeypatch)
        assert fv.config is not None and fv.workdir, argv
        return
    if prog == "unclip plan":  # absl flags like unclip train
        from unclip_jax.plan import commands as plan_commands

        monkeypatch.chdir(ROOT)
        flag_argv = ["unclip plan", *argv[2:]]
        fv = plan_commands.make_flags(flag_argv)
        fv(flag_argv)
        assert (fv.config is not None or fv.cascade) and fv.topology, argv
        return
    entry = _argparse_entry(argv)
    if entry is not None:
        parsed = parse_argparse(*entry, monkeypatch)
        if prog == "unclip convert":
            from unclip_jax.convert.commands import CHOICES

            assert parsed.namespace.component in CHOICES, argv
        if prog == "python -m unclip_jax.bench":
            from unclip_jax.bench import PHASES

            assert set(parsed.namespace.only.split(",")) <= set(PHASES), argv
        return
    if prog == "make":
        makefile = (ROOT / "Makefile").read_text()
        for arg in argv[1:]:
            if "=" in arg:
                assert re.search(rf"^{re.escape(arg.split('=')[0])}\s*\??=", makefile, re.M), arg
            else:
                assert re.search(rf"^{re.escape(arg)}:", makefile, re.M), f"make {arg}: no such target"
        return
    if prog == "pip":
        makefile = (ROOT / "Makefile").read_text()
        for pin in (a for a in argv if "==" in a):
            assert pin in makefile, f"{pin}: not the version the Makefile installs"
        return
    if prog == "python -m pytest":
        for arg in (a for a in argv if a.startswith("tests/")):
            assert (ROOT / arg).exists(), arg
        return
    pytest.fail(f"{argv}: a command this test does not know how to check; teach it (tests/test_readme.py)")


def _runnable(argv: list[str]) -> bool:
    prog = program(argv)
    if argv[-1] in ("--help", "-h") or prog == "python -c":
        return True
    if prog == "data/make_synthetic.py":
        n = argv[argv.index("--num_examples") + 1] if "--num_examples" in argv else "20000"
        return int(n) <= 1000
    return False


RUN = [(e, c) for e, c in ALL if _runnable(c)]


@pytest.mark.parametrize("env, argv", RUN, ids=[f"{i:02d} {_id(c)}" for i, (_, c) in enumerate(RUN)])
def test_cheap_commands_run(env, argv, tmp_path):
    """Runs the command as written (``.venv/bin/`` = this venv; ``workdirs/`` -> a temporary folder)."""
    argv = [str(BIN / a[len(".venv/bin/") :]) if a.startswith(".venv/bin/") else a for a in argv]
    argv = [a.replace("workdirs/", f"{tmp_path}/workdirs/") for a in argv]
    run_env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    run_env.pop("XLA_FLAGS", None)
    proc = subprocess.run(argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if "JAX_NUM_CPU_DEVICES" in env:
        assert proc.stdout.split()[-1] == env["JAX_NUM_CPU_DEVICES"], proc.stdout


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    """Every option string of the programs the README documents."""
    from unclip_jax import main as main_lib
    from unclip_jax.convert import commands as convert_commands
    from unclip_jax.evaluate import commands as evaluate_commands
    from unclip_jax.pipeline import commands as pipeline_commands

    parsers = []
    for add, _, _ in pipeline_commands.COMMANDS.values():
        p = argparse.ArgumentParser()
        add(p)
        parsers.append(p)
    p = argparse.ArgumentParser()
    evaluate_commands.add_arguments(p)
    parsers.append(p)
    p = argparse.ArgumentParser()
    convert_commands.add_parser(p.add_subparsers())
    parsers.append(p._subparsers._group_actions[0].choices["convert"])
    flags = {s for p in parsers for s in p._option_string_actions}
    # The argparse scripts and modules: capture their parsers on a minimal valid argv.
    mp = pytest.MonkeyPatch()
    try:
        for entry, argv in [
            (_load_script(ROOT / "data/make_synthetic.py").main, ["--out", "x"]),
            (_load_script(ROOT / "data/prepare_folder.py").main, ["--out", "x"]),
            (_load_script(ROOT / "data/prepare_coco.py").main, ["--out", "x"]),
            (_load_script(ROOT / "data/precompute_embeddings.py").main, ["--src", "x", "--out", "y"]),
            (_load_script(ROOT / "tools/train_parity.py").main, []),
            (importlib.import_module("unclip_jax.bench").main, []),
            (importlib.import_module("unclip_jax.demo.__main__").main, ["--workdir", "x"]),
            (importlib.import_module("unclip_jax.demo.inpaint").main, ["--workdir", "x"]),
            (
                importlib.import_module("unclip_jax.pipeline.inpaint").main,
                ["x", "i.png", "--mask", "m", "--prompt", "p"],
            ),
        ]:
            flags |= set(parse_argparse(entry, argv, mp).parser._option_string_actions)
    finally:
        mp.undo()
    flags |= {f"--{name}" for name in main_lib.make_flags(["x"])}
    from unclip_jax.plan import commands as plan_commands

    plan_flags = plan_commands.make_flags(["x"])
    flags |= {f"--{name}" for name in plan_flags} | {f"--no{name}" for name in plan_flags if plan_flags[name].boolean}
    return flags


def test_every_flag_in_the_readme_exists(known_flags):
    mentioned = {f.rstrip(".") for f in re.findall(r"(?<![\w-])--[A-Za-z][\w.-]*", TEXT)}
    unknown = sorted(f for f in mentioned if not f.startswith("--config.") and f not in known_flags | EXTERNAL_FLAGS)
    assert not unknown, f"flags in README.md that no documented program has: {unknown}"


def _experiment(name: str):
    return _load_script(ROOT / "experiments" / f"{name}.py")


def _has_field(cfg: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(cfg, "keys") or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def test_every_config_field_in_the_readme_exists():
    configs = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        module = _experiment(path.stem)
        configs += [module.get_config(v) for v in module.VARIANTS]
    fields = {f.rstrip(".") for f in re.findall(r"--config\.([A-Za-z_][\w.]*)", TEXT)}
    assert fields, "no --config.<field> in the README?"
    missing = sorted(f for f in fields if not any(_has_field(c, f) for c in configs))
    assert not missing, f"--config fields in README.md that no experiment has: {missing}"


def test_every_experiment_and_variant_in_the_readme_exists():
    refs = set(re.findall(r"experiments/(\w+)\.py(?::(\w+))?", TEXT))
    assert ("prior", "test") in refs
    for name, variant in sorted(refs):
        assert (ROOT / "experiments" / f"{name}.py").is_file(), f"experiments/{name}.py"
        if variant:
            assert variant in _experiment(name).VARIANTS, f"experiments/{name}.py:{variant}"


def test_model_zoo_lists_every_experiment_variant():
    zoo = TEXT[TEXT.index("## Model zoo") : TEXT.index("## Benchmarks")]
    for path in sorted((ROOT / "experiments").glob("*.py")):
        for variant in _experiment(path.stem).VARIANTS:
            assert f"`experiments/{path.stem}.py:{variant}`" in zoo, f"{path.stem}:{variant} missing from the zoo"


def _zoo_count(config: Any) -> int:
    """Parameters of an experiment's model (``jax.eval_shape`` of init with the experiment's model overrides)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from unclip_jax.train.tasks.base import model_kwargs

    kind = config.task.name
    models = importlib.import_module(f"unclip_jax.models.{kind}")
    kw = model_kwargs(config.model)
    m = models.build(config.model.variant, **{k: v for k, v in kw.items() if k != "remat"})
    if kind in ("prior", "ar_prior"):
        args, kwargs = (), models.example_inputs(m)
    elif kind == "clip":
        size = dict(m.vision)["image_size"]
        args, kwargs = (jnp.zeros((1, 77), jnp.int32), jnp.zeros((1, size, size, 3))), {}
    elif kind == "decoder":
        d, s = m.clip_embeddings_dim, config.data.image_size
        z = jnp.zeros((1, d))
        args, kwargs = (jnp.zeros((1, s, s, 3)), jnp.zeros((1,)), z, z, jnp.zeros((1, 7, m.context_dim))), {}
    else:
        s = m.downsampling_factor * 2
        args, kwargs = (jnp.zeros((1, s, s, 3)), jnp.zeros((1,)), jnp.zeros((1, s, s, 3))), {}
    params = nn.unbox(jax.eval_shape(lambda: m.init(jax.random.key(0), *args, **kwargs)))["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_model_zoo_counts_and_batches_are_computed():
    # The small variants here (the karlo / paper counts are checked against diffusers / transformers elsewhere).
    zoo = TEXT[TEXT.index("## Model zoo") : TEXT.index("## Benchmarks")]
    rows = dict(re.findall(r"^\| `experiments/(\w+\.py:\w+)` \| ([^\n]*)$", zoo, re.M))
    for path in sorted((ROOT / "experiments").glob("*.py")):
        for variant in ("test", "tiny", "bench"):
            if variant not in _experiment(path.stem).VARIANTS:
                continue
            config = _experiment(path.stem).get_config(variant)
            row = rows[f"{path.stem}.py:{variant}"]
            cells = [c.strip() for c in row.strip(" |").split("|")]
            want_model = f"{config.task.name} `{config.model.variant}`"
            want_count = f"{_zoo_count(config):,}"
            steps = config.total_steps
            want_steps = (
                f"{config.batch_size:,} x {steps // 1000}k" if steps >= 10_000 else f"{config.batch_size:,} x {steps:,}"
            )
            got = (cells[0].split(" (")[0], cells[1], cells[3])  # "(...)" after the model variant: a remark
            assert got == (want_model, want_count, want_steps), (
                f"{path.stem}.py:{variant}: README {got}, computed {(want_model, want_count, want_steps)}"
            )


def test_python_blocks_use_names_that_exist():
    for block in blocks("python"):
        tree = ast.parse(block)
        modules: dict[str, Any] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(base, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
                    obj = getattr(base, alias.name, None) or importlib.import_module(f"{node.module}.{alias.name}")
                    modules[alias.asname or alias.name] = obj
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    modules[alias.asname or alias.name] = importlib.import_module(alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                owner = modules[node.value.id]
                if isinstance(owner, type(sys)):
                    assert hasattr(owner, node.attr), f"{node.value.id}.{node.attr} does not exist"


def test_package_layout_matches_the_tree():
    block = next(b for b in blocks("") if b.startswith("unclip_jax/\n"))
    listed = set(re.findall(r"^  (\w+(?:/|\.py))", block, flags=re.M))
    pkg = ROOT / "unclip_jax"
    actual = {f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    actual |= {p.name for p in pkg.glob("*.py") if p.name != "__init__.py"}
    assert listed == actual, f"README layout: missing {sorted(actual - listed)}, stale {sorted(listed - actual)}"
    for top in re.findall(r"^(\w+)/ ", block, flags=re.M):
        assert (ROOT / top).is_dir(), top


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_and_anchors_resolve():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", TEXT, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", TEXT):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"README link {target}: no such heading"
        else:
            assert (ROOT / target).exists(), f"README link {target}: no such file (the demo picture is copied there)"
