"""The demo's profiles: what one run does (dataset sizes, experiment variants, step counts, sampler steps).

Every profile draws the built-in dataset's ``large`` scenes (:data:`unclip_jax.input.synthetic.SCENES`): at the
32x32 the ``make demo`` decoder draws, a small object of the ``standard`` scenes is 7 pixels across, and with the same
training the decoder got its colour right far less often there (README demo section).

``full`` is ``make demo``: the ``tiny`` experiments with step counts that fit a 20-minute budget on a 2-core CPU;
``long`` is ``make demo PROFILE=long``: the same models trained for hours, its cascade one level lower (a 16x16
decoder, upsampled x4 to 64x64; resumable; every CLIP and decoder checkpoint kept for the accuracy-vs-steps curves
of :mod:`unclip_jax.demo.curves`); ``fast`` is ``--fast``: the ``test`` experiments, a few steps each (an
end-to-end smoke run).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unclip_jax.input import synthetic

# The demo CLIP that holds shape in its image embedding: Xiao et al.'s convolutional stem in place of the patch
# convolution, and hard-negative captions that differ from the true one only in a shape word (NegCLIP). Either alone
# leaves zero-shot shape near chance on the built-in data; together they lift it as training goes on (README demo).
SHAPE_CLIP: dict[str, Any] = {
    "model.overrides.vision.stem": "conv",
    "data.caption_swaps": synthetic.shape_swaps(),
}


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
    diversity_n: int = 8  # samples per prompt, mode and guidance scale (:mod:`unclip_jax.demo.diversity`)
    diversity_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # decoder guidance scales of the diversity study
    curve_n: int = 0  # validation captions per point of the accuracy-vs-steps curves (0: no curve stage)
    curve_points: int = 6  # checkpoints per curve (evenly spread over the kept ones, always the last)
    probe_n: int = 0  # validation images of the final decoder's layout probe (:mod:`unclip_jax.demo.probe`; 0: none)
    scenes: str = synthetic.DEFAULT_SCENES  # the built-in dataset's scene distribution (:data:`synthetic.SCENES`)


# The long profile's decoder output side: the 16x16 bench's shape curve (README demo section) at about a fifth of
# the 32x32 step's cost.
LONG_DECODER_SIZE = 16

PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        scenes="large",
        n_train=4_000,
        n_val=192,
        n_up=1_500,
        up_size=128,
        variant="tiny",
        # The tiny experiments carry the demo's settings (steps, batch sizes, learning rates); every CLIP and decoder
        # checkpoint is kept for the accuracy-vs-steps curves.
        overrides={"clip": {"checkpoint.keep": 0}, "decoder": {"checkpoint.keep": 0}},
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
            "upsampler": 400,
            "classifier": 55,
            "sample": 110,
            "evaluate": 60,
        },
        curve_n=64,
        curve_points=4,
        probe_n=64,
    ),
    # Hours on a 2-core CPU: the tiny models, more data, the shape-holding CLIP (:data:`SHAPE_CLIP`), and a cascade
    # one level lower than the full profile's: the decoder draws 16x16 (:data:`LONG_DECODER_SIZE`) and the upsampler
    # takes it x4 to the data's 64x64. The decoder's shape accuracy turns only after ~160,000 examples and is still
    # rising at 320,000 (the README's decoder curve, measured at 16x16), and a 16x16 step costs about a fifth of a
    # 32x32 one, so the decoder sees 512,000 examples in about the time 32x32 takes for 100,000.
    "long": Profile(
        name="long",
        scenes="large",
        n_train=20_000,
        n_val=256,
        n_up=0,  # the upsampler reads the 64x64 training set (its output size)
        up_size=64,
        variant="tiny",
        overrides={
            "clip": {**SHAPE_CLIP, "total_steps": 1_000, "checkpoint.every": 100, "checkpoint.keep": 0},
            "prior": {"total_steps": 3_000, "checkpoint.every": 500},
            "decoder": {
                "data.image_size": LONG_DECODER_SIZE,
                "total_steps": 32_000,
                "checkpoint.every": 1_000,
                "checkpoint.keep": 0,
            },
            "upsampler": {
                # x4 (the paper's ratio) from the decoder's 16x16 to 64x64, trained on 32x32 crops of 8x8 low-res
                # like the tiny upsampler's 32 -> 128.
                "data.target_size": 4 * LONG_DECODER_SIZE,
                "data.crop_fraction": 0.5,
                "total_steps": 2_000,
                "checkpoint.every": 500,
            },
        },
        classifier_steps=600,
        classifier_variant="default",
        classifier_train=6_000,
        n_eval=128,
        grid_per_prompt=4,
        # The prior unguided: with the shape-holding CLIP its guided embeddings (at the full profile's scale) lose
        # shape that its unguided ones keep, and decode grainier (README demo section, "The prior's guidance").
        sample_settings={
            "prior": dict(steps=25, guidance_scale=1.0),
            "decoder": dict(steps=25, sampler="ddim", guidance_scale=3.0),
            "super_res": dict(steps=7, sampler="ddim"),
        },
        budget_s={},
        curve_n=128,
        curve_points=12,
        probe_n=128,
    ),
    "fast": Profile(
        name="fast",
        scenes="large",
        n_train=128,
        n_val=48,
        n_up=0,  # the test upsampler trains on 32x32 targets: the 64x64 set serves
        up_size=64,
        variant="test",
        overrides={
            s: {
                "total_steps": 2,
                "log_every": 1,
                "checkpoint.every": 1,
                "checkpoint.keep": 0,
                "data.prefetch_batches": 0,
            }
            for s in ("clip", "prior", "decoder", "upsampler")
        },
        classifier_steps=20,
        classifier_variant="test",
        classifier_train=128,
        n_eval=8,
        grid_per_prompt=1,
        sample_settings={"prior": dict(steps=3), "decoder": dict(steps=3), "super_res": dict(steps=2)},
        budget_s={},
        diversity_n=2,
        diversity_scales=(1.0, 4.0),
        curve_n=4,
        probe_n=4,
    ),
}
