"""What the bench measures: the train step of each stage's ``bench`` experiment and the ``bench`` cascade.

The stages come from the registry (:mod:`unclip_jax.stages`): a train phase is a training task with a diffusers
counterpart (:data:`TRAIN`), its settings are its experiment file's ``bench`` variant, its weights reach
PyTorch through the task's pipeline component converter, and the cascade samples with every stage's default
sampling settings. The random batches have the shapes of the task's input pipeline
(:mod:`unclip_jax.input.pipelines`).
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
      batch_size: the measured step's batch (a few seconds per step on 2 CPU cores); every other setting is the
        experiment file's ``bench`` variant.
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
TEXT_TOKENS = 77  # CLIP's context length: the caption hidden states of the decoder's batch
NULL_CAPTION = "null_caption.npz"


def experiment_spec(task: str) -> str:
    """``experiments/<file>.py:bench`` of a task (its first experiment file in the registry)."""
    return f"experiments/{stages.task(task).experiments[0]}:bench"


def experiment_config(task: str, overrides: dict[str, Any] | None = None) -> Any:
    """The locked config of the task's ``bench`` experiment at the measured batch size, with ``overrides``."""
    from unclip_jax.train.config_loading import load_experiment

    return load_experiment(experiment_spec(task), {"batch_size": TRAIN[task].batch_size, **(overrides or {})})


def train_config(task: str, workdir: Path) -> Any:
    """The task's ``bench`` experiment as the bench trains it, comparable with diffusers.

    diffusers' ``PriorTransformer`` has no learned null caption: a network with ``learned_null_text`` trains here
    with the (all-zero) CLIP("") stand-in as its dropped caption instead, so that both sides hold the same weights.
    """
    import numpy as np

    from unclip_jax.train.tasks.decoder import zeros_caption

    config = experiment_config(task)
    module = stages.resolve(stages.task(task).network).build(config.model.variant)
    if not hasattr(module, "learned_null_text"):
        return config
    null = workdir / NULL_CAPTION
    np.savez(null, **zeros_caption(module.embedding_dim, module.num_embeddings))
    return experiment_config(task, {"model.overrides.learned_null_text": False, "task.null_caption": str(null)})


def image_size(config: Any) -> int:
    """The side of the images a task's batch holds (decoder: ``data.image_size``, upsampler: its crop)."""
    if stages.task(config.task.name).input_stage == "upsampler":
        return int(round(config.data.crop_fraction * config.data.target_size))
    return int(config.data.image_size)


def random_batch(config: Any, module: Any, seed: int = 0) -> dict[str, Any]:
    """A random batch with the shapes of the task's input pipeline (numpy, NHWC images in [-1, 1])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b = config.batch_size
    kind = stages.task(config.task.name).input_stage
    if kind == "prior":
        d, n = module.embedding_dim, module.num_embeddings
        return {
            "image_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_hidden_states": rng.standard_normal((b, n, d), dtype=np.float32),
            "text_mask": np.ones((b, n), bool),
        }
    size = image_size(config)
    if kind == "decoder":
        d = module.clip_embeddings_dim
        return {
            "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
            "image_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_hidden_states": rng.standard_normal((b, TEXT_TOKENS, module.context_dim), dtype=np.float32),
            "text_mask": np.ones((b, TEXT_TOKENS), bool),
        }
    low = size // config.data.low_res_factor
    return {
        "image": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
        "low_res": rng.uniform(-1, 1, (b, low, low, 3)).astype(np.float32),
    }


def save_weights(task: str, module: Any, variables: dict[str, Any], folder: Path) -> None:
    """Writes a task's network in diffusers' layout (the converter of the pipeline component it trains)."""
    from unclip_jax.convert import decoder, prior, upsampler

    component = stages.task(task).component
    if component == "prior":
        prior.save_prior(module, variables, folder)
    elif component == "decoder":
        decoder.save_unclip_decoder(module, variables, folder)
    else:
        upsampler.save_upsampler(module, variables, folder)


def title(phase: str) -> str:
    """The report's name of a workload, e.g. ``decoder + text_proj train step, batch 8 at 64x64``."""
    if phase == "cascade":
        steps = "/".join(str(s.steps) for s in stages.STAGES if s.scheduler)
        return f"full cascade, {len(CASCADE_PROMPTS)} prompts, {steps} steps to 256x256"
    work, task = TRAIN[phase], stages.task(phase)
    out = f"{work.what} train step, batch {work.batch_size}"
    if task.input_stage == "prior":
        return out
    size = image_size(experiment_config(phase))
    return out + (f" on {size}x{size} crops" if task.input_stage == "upsampler" else f" at {size}x{size}")
