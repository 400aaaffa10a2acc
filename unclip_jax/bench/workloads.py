"""What the bench measures: the train step of each stage's ``bench`` experiment and the ``bench`` cascade.

The stages come from the registry (:mod:`unclip_jax.stages`): a train phase is a training task with a diffusers
counterpart (:data:`TRAIN`), its settings are its experiment file's ``bench`` variant, its weights reach
PyTorch through the task's pipeline component converter, and the cascade samples with every stage's default
sampling settings. The random batches have the shapes of the task's input pipeline
(:mod:`unclip_jax.plan.batches`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from unclip_jax import stages


@dataclasses.dataclass(frozen=True)
class TrainWorkload:
    """A task's train step as the bench measures it.

    Attributes:
      batch_size: the measured step's batch (below the experiment's training batch, so that a CPU run stays
        short); every other setting is the experiment file's ``bench`` variant.
      what: the report's name of the networks trained (diffusers splits the decoder into a U-Net and text_proj).
      conv_ab: whether the network is a U-Net whose step is also timed with either convolution implementation
        (:func:`unclip_jax.layers.conv.default_impl`).
    """

    batch_size: int
    what: str
    conv_ab: bool


# The tasks with a diffusers counterpart.
TRAIN: dict[str, TrainWorkload] = {
    "prior": TrainWorkload(32, "prior", conv_ab=False),
    "decoder": TrainWorkload(8, "decoder + text_proj", conv_ab=True),
    "upsampler": TrainWorkload(8, "upsampler", conv_ab=True),
}
TRAIN_PHASES: tuple[str, ...] = tuple(t.name for t in stages.TASKS if t.name in TRAIN)
CASCADE = "bench"  # unclip_jax.pipeline.testing cascade of random components
CASCADE_PROMPTS = ("a red circle", "a blue square on green", "two yellow triangles", "a purple star")


def experiment_spec(task: str) -> str:
    """``experiments/<file>.py:bench`` of a task (its first experiment file in the registry)."""
    return f"experiments/{stages.task(task).experiments[0]}:bench"


def experiment_config(task: str, overrides: dict[str, Any] | None = None) -> Any:
    """The locked config of the task's ``bench`` experiment at the measured batch size, with ``overrides``."""
    from unclip_jax.train.config_loading import load_experiment

    return load_experiment(experiment_spec(task), {"batch_size": TRAIN[task].batch_size, **(overrides or {})})


def train_config(task: str, workdir: Path) -> Any:
    """The task's ``bench`` experiment as the bench trains it, comparable with diffusers.

    diffusers has no learned null caption: a network with ``learned_null_text`` trains here with a CLIP("")
    stand-in as its dropped caption instead (:func:`unclip_jax.plan.batches.add_stand_in_files`, in ``workdir``),
    so that both sides hold the same weights.
    """
    from unclip_jax.plan.batches import add_stand_in_files

    config = experiment_config(task)
    if "learned_null_text" in config.model.overrides:
        config = experiment_config(task, {"model.overrides.learned_null_text": False})
    add_stand_in_files(config, str(workdir))
    return config


def network(config: Any) -> Any:
    """The task's network module (unbound: its fields give the batch's widths)."""
    from unclip_jax.train.tasks.base import model_kwargs

    return stages.resolve(stages.task(config.task.name).network).build(
        config.model.variant, **model_kwargs(config.model)
    )


def random_batch(config: Any, module: Any, seed: int = 0) -> dict[str, Any]:
    """A random batch with the shapes of the task's input pipeline (:func:`unclip_jax.plan.batches.batch_shapes`):
    numpy, NHWC images uniform in [-1, 1], embeddings standard normal, masks all visible, token ids zero."""
    import numpy as np

    from unclip_jax.plan.batches import batch_shapes

    rng = np.random.default_rng(seed)
    batch = {}
    for field, (shape, dtype) in batch_shapes(config, module).items():
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            batch[field] = np.ones(shape, bool)
        elif dtype.kind in "iu":
            batch[field] = np.zeros(shape, dtype)
        elif len(shape) == 4:
            batch[field] = rng.uniform(-1, 1, shape).astype(dtype)
        else:
            batch[field] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return batch


def save_weights(task: str, module: Any, variables: dict[str, Any], folder: Path) -> Path:
    """Writes a task's network in diffusers' layout: the registry converter of the pipeline component it trains
    (:func:`unclip_jax.convert.registry.for_component`)."""
    from unclip_jax.convert.registry import for_component

    return for_component(stages.task(task).component).save(module, variables, folder)


def title(phase: str) -> str:
    """The report's name of a workload, e.g. ``decoder + text_proj train step, batch 8 at 64x64``."""
    if phase == "cascade":
        steps = "/".join(str(s.steps) for s in stages.STAGES if s.scheduler)
        return f"full cascade, {len(CASCADE_PROMPTS)} prompts, {steps} steps to 256x256"
    from unclip_jax.plan.batches import batch_shapes

    work = TRAIN[phase]
    config = experiment_config(phase)
    out = f"{work.what} train step, batch {work.batch_size}"
    shapes = batch_shapes(config, network(config))
    if "image" not in shapes:
        return out
    size = shapes["image"][0][1]
    return out + (f" on {size}x{size} crops" if "low_res" in shapes else f" at {size}x{size}")
