"""The demo's profiles: what one run does (dataset sizes, experiment variants, step counts, sampler steps).

``full`` is ``make demo``: the ``tiny`` experiments with step counts that fit a 20-minute budget on a 2-core CPU;
``fast`` is ``--fast``: the ``test`` experiments, a few steps each (an end-to-end smoke run).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one demo run does (sizes, experiment variants, step counts, sampler steps)."""

    name: str
    n_train: int  # 64x64 training examples (seed 0)
    n_val: int  # 64x64 validation examples (seed 1): prompts, real baselines, FID reference
    n_up: int  # upsampler training examples (seed 2) at up_size
    up_size: int
    variant: str  # experiments/<stage>.py:<variant>
    overrides: dict[str, dict[str, Any]]  # stage -> {config field: value}
    classifier_steps: int
    classifier_variant: str
    classifier_train: int  # training images of the attribute classifier
    n_eval: int  # generated images for the metrics (one per validation caption)
    grid_per_prompt: int
    sample_settings: dict[str, dict[str, Any]]  # cascade stage -> StageSettings fields (steps, sampler, guidance)
    budget_s: dict[str, float]  # planned seconds per stage (the report compares)


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        n_train=4_000,
        n_val=192,
        n_up=1_500,
        up_size=128,
        variant="tiny",
        overrides={},  # the tiny experiments carry the demo's settings (steps, batch sizes, learning rates)
        classifier_steps=300,
        classifier_variant="default",
        classifier_train=3_000,
        n_eval=64,
        grid_per_prompt=4,
        sample_settings={
            "prior": dict(steps=25, guidance_scale=4.0),
            "decoder": dict(steps=25, sampler="ddim", guidance_scale=3.0),
            "super_res": dict(steps=7, sampler="ddim"),
        },
        budget_s={  # planned seconds on a 2-core CPU
            "data": 10,
            "clip": 90,
            "embed": 10,
            "prior": 120,
            "decoder": 480,
            "upsampler": 100,
            "classifier": 55,
            "sample": 110,
            "evaluate": 60,
        },
    ),
    "fast": Profile(
        name="fast",
        n_train=128,
        n_val=48,
        n_up=0,  # the test upsampler trains on 32x32 targets: the 64x64 set serves
        up_size=64,
        variant="test",
        overrides={
            s: {"total_steps": 2, "log_every": 1, "checkpoint.every": 2, "data.prefetch_batches": 0}
            for s in ("clip", "prior", "decoder", "upsampler")
        },
        classifier_steps=20,
        classifier_variant="test",
        classifier_train=128,
        n_eval=8,
        grid_per_prompt=1,
        sample_settings={"prior": dict(steps=3), "decoder": dict(steps=3), "super_res": dict(steps=2)},
        budget_s={},
    ),
}
