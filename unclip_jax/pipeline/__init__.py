"""unclip_jax.pipeline: the unCLIP cascade (paper section 2) and its image manipulations (section 3).

Modules:
    cascade        UnclipPipeline: text -> CLIP -> prior -> decoder -> upsamplers, one jit program.
    manipulations  variations, interpolations, text diffs, PCA probing (the bipartite latent (z_i, x_T)).
    loading        load_pipeline: components from training workdirs, native or diffusers (Karlo) folders.
    images         PNG writing and labelled grids.
    commands       the ``unclip sample | vary | interpolate | textdiff`` commands (cli_* modules wrap them).
"""

from unclip_jax.pipeline.cascade import DEFAULT_SETTINGS, Component, StageSettings, UnclipPipeline

__all__ = ["DEFAULT_SETTINGS", "Component", "StageSettings", "UnclipPipeline"]
