"""Tasks: the only place networks meet diffusion. :func:`make_task` builds the one named by ``config.task.name``.

Each task module holds its Task class and its factory ``make_<name>_task(config)``; the stage registry
(:data:`unclip_jax.stages.TASKS`) names the factory of every task, so nothing here lists them.
"""

from __future__ import annotations

from typing import Any

from unclip_jax import stages
from unclip_jax.train.tasks.base import Task


def make_task(config: Any) -> Task:
    """Builds the task of ``config.task.name`` with its model (``config.model.variant``) and diffusion.

    Raises:
      ValueError: naming ``config.task.name`` / ``config.model.variant`` when unknown.
    """
    return stages.resolve(stages.task(config.task.name).factory)(config)
