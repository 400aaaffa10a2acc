"""The `unclip` command: one entry point, one sub-command per job.

    unclip train --config=experiments/decoder.py:test --workdir=DIR   # the shared train loop
    unclip convert import|export ...                                  # the weight bridge

Sub-commands are imported lazily so that `unclip --help` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, help). A module provides add_arguments(parser) and run(args) -> int,
# except `train`, which hands its argv to absl (``unclip_jax.main``).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("unclip_jax.main", "train one stage with an ml_collections experiment file"),
    "convert": ("unclip_jax.convert.commands", "import/export weights in the diffusers/transformers layout"),
}


def main(argv: list[str] | None = None) -> int:
    """Runs the `unclip` command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="unclip", description="unCLIP (DALL-E 2) in JAX/Flax")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if name == "train":
        return module.main(["unclip train", *rest]) or 0
    if name == "convert":
        return int(module.main(["convert", *rest]) or 0)
    cmd_parser = argparse.ArgumentParser(prog=f"unclip {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
