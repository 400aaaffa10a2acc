"""unclip_jax.diffusion: Gaussian diffusion maths in pure jax.numpy / numpy (no Flax, no optax).

Modules:
    schedules  beta schedules (cosine = squaredcos_cap_v2, linear), float64 numpy.
    gaussian   GaussianDiffusion: q_sample, posterior, eps/x0/v conversions, p_mean_variance, training losses.
    respace    space_timesteps ("ddimN", "N", "10,10,5", "unclipN", lists) and respace().
    sampling   ancestral DDPM (UnCLIPScheduler), DDIM (eta), DDIM inversion; each one lax.scan.
    config     diffusion_from_config: the one reader of config.diffusion / diffusion.json fields.
    guidance   classifier-free guidance as a wrapper of denoise_fn.
    timesteps  training timestep sampling: uniform, importance sampling of the VLB terms.
"""

from unclip_jax.diffusion.config import diffusion_from_config
from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.guidance import classifier_free_guidance
from unclip_jax.diffusion.respace import respace, space_timesteps
from unclip_jax.diffusion.sampling import (
    ddim_reverse_loop,
    ddim_sample,
    ddim_sample_loop,
    p_sample,
    p_sample_loop,
)
from unclip_jax.diffusion.schedules import get_named_beta_schedule
from unclip_jax.diffusion.timesteps import sample_timesteps

__all__ = [
    "GaussianDiffusion",
    "classifier_free_guidance",
    "ddim_reverse_loop",
    "ddim_sample",
    "ddim_sample_loop",
    "diffusion_from_config",
    "get_named_beta_schedule",
    "p_sample",
    "p_sample_loop",
    "respace",
    "sample_timesteps",
    "space_timesteps",
]
