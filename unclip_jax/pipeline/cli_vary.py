"""``unclip vary``: see `unclip_jax.pipeline.commands` (module with add_arguments/run for ``unclip_jax.cli``)."""

from __future__ import annotations

import argparse

from unclip_jax.pipeline import commands


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands.add_vary_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return commands.run_vary(args)
