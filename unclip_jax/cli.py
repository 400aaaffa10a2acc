"""The `unclip` command: one entry point, one sub-command per job.

    unclip train --config=experiments/decoder.py:test --workdir=DIR   # the shared train loop
    unclip convert import|export ...                                  # the weight bridge
    unclip sample|vary|interpolate|textdiff ...                       # the cascade and manipulations
    unclip evaluate ...                                               # FID / CLIP score protocol
    unclip plan --config=experiments/decoder.py:paper --topology=v5p:4x4x8  # TPU fit, compiled on this machine

Sub-commands are imported lazily so that `unclip --help` stays fast and light.

A user error (a missing or unreadable file, a value out of its domain, a work directory in use, a stage output holding
NaN) is one line ``unclip <command>: <message>`` and exit code 2 (:data:`USER_ERRORS`); ``UNCLIP_TRACEBACK=1`` shows
the traceback instead. Ctrl-C outside training exits 130 without one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from unclip_jax.logs import QUIET_LOGGERS, quiet_accelerator_probe

# sub-command -> (module, argv prefix, help). Each module has main(argv) -> int; the prefix is what its
# own argv starts with (absl wants a program name, the multi-command modules want the command name).
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "train": ("unclip_jax.main", ("unclip train",), "train one stage with an ml_collections experiment file"),
    "convert": (
        "unclip_jax.convert.commands",
        ("convert",),
        "import/export weights in the diffusers/transformers layout",
    ),
    "sample": ("unclip_jax.pipeline.commands", ("sample",), "text -> images through the cascade"),
    "vary": ("unclip_jax.pipeline.commands", ("vary",), "variations of an image (DDIM inversion)"),
    "interpolate": ("unclip_jax.pipeline.commands", ("interpolate",), "interpolate between two images"),
    "textdiff": ("unclip_jax.pipeline.commands", ("textdiff",), "edit an image along a text diff"),
    "evaluate": ("unclip_jax.evaluate.commands", (), "FID / CLIP score (MS-COCO 30k protocol, sweeps)"),
    "plan": ("unclip_jax.plan.commands", ("unclip plan",), "compile a train step for a TPU slice: memory, FLOPs, days"),
    "inpaint": (
        "unclip_jax.pipeline.inpaint",
        ("unclip inpaint",),
        "fill the masked region of an image under a caption",
    ),
}


# What a command raises on bad input (each names the file, field or value): one line, not a traceback. ValueError
# covers the package's own errors (PipelineLoadError, ConversionError, ConfigError, CheckpointError);
# FloatingPointError a non-finite stage output or loss; RuntimeError subclasses are listed by name (WorkdirLocked).
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, FloatingPointError)
USER_ERROR_NAMES = ("WorkdirLocked",)


def _is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or type(e).__name__ in USER_ERROR_NAMES


def main(argv: list[str] | None = None) -> int:
    """Runs the `unclip` command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="unclip", description="unCLIP (DALL-E 2) in JAX/Flax")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, prefix, _ = COMMANDS[argv[0]]
    quiet_accelerator_probe()
    for name, level in QUIET_LOGGERS.items():  # e.g. JAX's "Unable to initialize backend 'tpu'" on every CPU start
        logging.getLogger(name).setLevel(level)
    if os.environ.get("UNCLIP_TRACEBACK"):
        return int(importlib.import_module(module_name).main([*prefix, *argv[1:]]) or 0)
    try:
        module = importlib.import_module(module_name)
        return int(module.main([*prefix, *argv[1:]]) or 0)
    except KeyboardInterrupt:
        print(f"unclip {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a command that exits with its message (``raise SystemExit("unclip: ...")``)
        if not isinstance(e.code, str):
            raise
        text = e.code.removeprefix("unclip:").strip()
        print(f"unclip {argv[0]}: {text}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _is_user_error(e):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"unclip {argv[0]}: {text} (UNCLIP_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
