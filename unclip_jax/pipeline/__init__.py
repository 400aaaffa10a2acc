"""unclip_jax.pipeline: the unCLIP cascade (paper section 2) and its image manipulations (section 3).

Modules:
    cascade        UnclipPipeline: text -> CLIP -> prior -> decoder -> upsamplers, one jit program.
    settings       StageSettings, DEFAULT_SETTINGS (from the stage registry), default_diffusion.
    plan           Plan: the static part of one compiled cascade program.
    priors         the prior protocol (PriorSampler) and the diffusion prior; ar_prior: the autoregressive one.
    program        the stages as functions, the jitted cascade, Program (a bound plan, optionally batch-sharded).
    loops, ops     one stage's sampling loop; CLIP encoding, resize, slerp.
    manipulations  variations, interpolations, text diffs, PCA probing (the bipartite latent (z_i, x_T)).
    loading        load_pipeline: components from training workdirs, native or diffusers (Karlo) folders.
    images         PNG writing and labelled grids.
    flags          the command-line flags shared by the sampling and evaluation commands.
    commands       the ``unclip sample | vary | interpolate | textdiff`` commands.
"""

from unclip_jax.pipeline.cascade import Component, UnclipPipeline
from unclip_jax.pipeline.ops import resize, slerp
from unclip_jax.pipeline.plan import Plan
from unclip_jax.pipeline.priors import prior_kind
from unclip_jax.pipeline.program import Program
from unclip_jax.pipeline.settings import (
    DEFAULT_SETTINGS,
    STAGES,
    StageSettings,
    default_diffusion,
    resolve_settings,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "STAGES",
    "Component",
    "Plan",
    "Program",
    "StageSettings",
    "UnclipPipeline",
    "default_diffusion",
    "prior_kind",
    "resize",
    "resolve_settings",
    "slerp",
]
