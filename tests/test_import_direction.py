"""Enforces the one-way dependency rule of the design (README "Package layout").

diffusion <- layers <- models <- train; the cascade is assembled only in pipeline;
nothing imports experiments/; only main/cli import train/; `import unclip_jax` and the
model/diffusion modules load neither torch nor tensorflow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "unclip_jax"

# For each part of the package: the other parts of unclip_jax it may import.
ALLOWED = {
    "stages": {"stages"},
    "logs": {"logs"},
    "chips": {"chips"},
    "diffusion": {"diffusion", "stages"},
    "layers": {"layers", "stages"},
    "models": {"layers", "models", "stages"},
    "convert": {"convert", "models", "layers", "diffusion", "stages"},
    "input": {"input", "models", "layers", "parallel", "stages"},
    "parallel": {"parallel", "layers", "stages"},
    "train": {
        "train",
        "diffusion",
        "layers",
        "models",
        "input",
        "parallel",
        "convert",
        "checkpoints",
        "stages",
        "chips",
    },
    "checkpoints": {"checkpoints", "stages"},
    "pipeline": {"pipeline", "diffusion", "models", "layers", "convert", "input", "parallel", "checkpoints", "stages"},
    "evaluate": {
        "evaluate",
        "pipeline",
        "models",
        "layers",
        "convert",
        "input",
        "parallel",
        "checkpoints",
        "diffusion",
        "stages",
    },
    # `unclip plan`: ahead-of-time compiles of the train step and the cascade for TPU topologies.
    "plan": {
        "plan",
        "train",
        "pipeline",
        "diffusion",
        "models",
        "layers",
        "convert",
        "input",
        "parallel",
        "stages",
        "chips",
    },
}
# Modules at the top of the package that may import anything (the entry points).
ENTRY_POINTS = {"main", "cli", "demo", "bench", "__init__"}
# Third-party frameworks that the pure parts must not import.
FORBIDDEN_THIRD_PARTY = {"diffusion": {"flax", "optax", "torch", "tensorflow"}}


def _part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_part_imports_only_what_the_design_allows():
    violations = []
    for path in sorted(PKG.rglob("*.py")):
        part = _part(path)
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top == "experiments":
                violations.append(f"{path.relative_to(PKG)} imports experiments ({mod})")
            if top in FORBIDDEN_THIRD_PARTY.get(part, set()):
                violations.append(f"{path.relative_to(PKG)} imports {mod}")
            if top != "unclip_jax" or mod == "unclip_jax":
                continue
            target = mod.split(".")[1]
            if part in ENTRY_POINTS:
                continue
            if part not in ALLOWED:
                violations.append(f"{path.relative_to(PKG)}: part {part!r} is not in the design table")
            elif target not in ALLOWED[part]:
                violations.append(f"{path.relative_to(PKG)} ({part}) imports {mod}")
    assert not violations, "\n".join(violations)


# Private names of other libraries' types that are their public protocol (namedtuple API).
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_SubParsersAction"}


def _private_uses(path: Path):
    """``from unclip_jax.x import _name`` of another module, and ``obj._name`` on anything but ``self``/``cls``
    where ``_name`` is not defined in the same file (another module's private part)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = path.relative_to(PKG.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {
        t.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)
    }
    defined |= {
        n.target.attr for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Attribute)
    }
    defined |= {n.target.id for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("unclip_jax")
            and node.module != own
        ):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    yield f"imports {a.name} from {node.module}"
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in PUBLIC_UNDERSCORE or name in defined:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            yield f"line {node.lineno}: uses {ast.unparse(node)}"


def test_no_private_names_cross_modules():
    violations = [f"{path.relative_to(PKG)} {use}" for path in sorted(PKG.rglob("*.py")) for use in _private_uses(path)]
    assert not violations, "\n".join(violations)


def test_import_is_light():
    code = (
        "import sys, unclip_jax, unclip_jax.diffusion, unclip_jax.layers, unclip_jax.models; "
        "import pkgutil, importlib\n"
        "for sub in ('diffusion', 'layers', 'models'):\n"
        "    pkg = importlib.import_module('unclip_jax.' + sub)\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'unclip_jax.{sub}.{m.name}')\n"
        "heavy = [m for m in ('torch', 'tensorflow', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
