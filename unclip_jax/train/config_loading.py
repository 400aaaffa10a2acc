"""Experiment configs by spec: ``load_experiment("experiments/prior.py:bench", overrides={"batch_size": 32})``.

An experiment spec is what ``--config=`` takes on the command line (:mod:`unclip_jax.main`): the path of an
``experiments/<stage>.py`` file, optionally followed by ``:<arg>`` for its ``get_config(arg)``. The file is loaded by
path with ml_collections' own config-file parser (the one behind ``config_flags.DEFINE_config_file``), so a config
loaded here is the config ``unclip train --config=<spec>`` trains with: complete (every field of
:func:`unclip_jax.train.defaults.base_config`) and locked (an unknown override is an error naming it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

# The repository root: relative experiment paths are looked up in the working directory first, then here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def experiment_path(spec: str) -> str:
    """The experiment file of ``spec`` (``path[:arg]``), relative to the working directory or the repository root.

    Raises:
      FileNotFoundError: naming the spec when neither has the file.
    """
    path = spec.split(":", 1)[0]
    if os.path.isabs(path) or os.path.exists(path):
        candidates = [path]
    else:
        candidates = [path, os.path.join(REPO_ROOT, path)]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"experiment {spec!r}: no file {path!r} (looked in {candidates})")


def load_experiment(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The locked config of an experiment spec, e.g. ``"experiments/prior.py:bench"``, with ``overrides`` applied.

    Args:
      spec: ``<file>.py`` or ``<file>.py:<arg>`` (``get_config(arg)``), as ``--config=`` of ``unclip train``.
      overrides: dotted field names to values (``{"optim.lr": 1e-3, "data.folder": "..."}``), as
        ``--config.<field>=value``; each must name an existing field and keep its type.

    Raises:
      FileNotFoundError: the experiment file does not exist.
      KeyError / TypeError: an override names an unknown field or has the wrong type.
    """
    path = experiment_path(spec)
    arg = spec.split(":", 1)[1:]
    config = ConfigFileFlagParser("experiment", lock_config=True).parse(":".join([path, *arg]))
    if overrides:
        config.update_from_flattened_dict(dict(overrides))
    return config
