"""How each stage of the cascade is sampled: :class:`StageSettings`, their defaults and each stage's training diffusion.

The stages and their defaults come from the stage registry (:data:`unclip_jax.stages.STAGES`): Karlo's
``UnCLIPPipeline`` settings (prior 25 steps / guidance 4, decoder 25 / guidance 8, super-res 7) and the paper's DDIM 15
steps for the 256->1024 upsampler; the default training diffusions are the registry's ``config.diffusion`` fields
built by :func:`unclip_jax.diffusion.diffusion_from_config` (Karlo's schedulers, paper appendix C).

A setting splits into a static part that shapes the compiled program (:meth:`StageSettings.static`: steps, sampler,
guided or not, the AR prior's top-k / top-p) and traced numbers (:func:`traced_values`: guidance scales, DDIM etas, the
AR prior's temperature), so changing a scale never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp

from unclip_jax import stages
from unclip_jax.diffusion import GaussianDiffusion, diffusion_from_config

STAGES: tuple[str, ...] = stages.STAGE_NAMES

# The autoregressive prior's fields and their "off" values (left out of `StageSettings.describe` while unset).
_AR_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How one diffusion stage is sampled.

    Attributes:
        steps: number of sampling steps (an int N means diffusers ``UnCLIPScheduler`` spacing, ``"unclipN"``: N steps
            from T-1 down to 0) or any spec of `unclip_jax.diffusion.respace.space_timesteps` (``"ddim27"``, ``"50"``).
        sampler: ``"ddpm"`` (strided ancestral, UnCLIPScheduler) or ``"ddim"`` (Song et al. 2021, with ``eta``).
        eta: DDIM eta (0 deterministic).
        guidance_scale: classifier-free guidance scale s (doubled batch, ``uncond + s (cond - uncond)``); None runs
            the conditional model only. Ignored by the upsamplers (not guided in the paper). With the autoregressive
            prior it is applied to the log-probabilities of every token (`unclip_jax.models.ar_prior.sample`).
        temperature, top_k, top_p: **autoregressive prior only** (ignored by the diffusion stages): the filters of the
            code tokens (`unclip_jax.models.ar_prior.filter_logits`; top_k 0 and top_p 1 are off). The AR prior
            ignores ``steps``, ``sampler`` and ``eta`` (it always draws its k + 1 tokens).
    """

    steps: int | str = 25
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 0.0
    guidance_scale: float | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"StageSettings.sampler={self.sampler!r}: expected 'ddpm' or 'ddim'")
        if self.eta < 0:
            raise ValueError(f"StageSettings.eta={self.eta}: must be >= 0")
        if self.sampler == "ddpm" and self.eta:
            raise ValueError("StageSettings.eta only applies to sampler='ddim'")
        if not self.temperature > 0:
            raise ValueError(f"StageSettings.temperature={self.temperature}: must be > 0")
        if self.top_k < 0:
            raise ValueError(f"StageSettings.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"StageSettings.top_p={self.top_p}: must be in (0, 1] (1 = off)")

    @property
    def spacing(self) -> str:
        """The respacing spec of ``steps`` (`unclip_jax.diffusion.respace.space_timesteps`)."""
        return f"unclip{self.steps}" if isinstance(self.steps, int) else str(self.steps)

    def static(self) -> StageSettings:
        """The part that shapes the compiled program (the guidance scale, eta and temperature values are traced)."""
        return dataclasses.replace(
            self, guidance_scale=None if self.guidance_scale is None else 0.0, eta=0.0, temperature=1.0
        )

    def describe(self) -> dict[str, Any]:
        """The fields as a dict for reports; the AR-prior-only fields are left out while at their defaults (so the
        description of a diffusion-stage setting does not mention them)."""
        out = dataclasses.asdict(self)
        for name, default in _AR_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        return out


DEFAULT_SETTINGS: dict[str, StageSettings] = {
    s.name: StageSettings(s.steps, s.sampler, guidance_scale=s.guidance_scale) for s in stages.STAGES
}


def default_diffusion(stage: str) -> GaussianDiffusion:
    """The training diffusion of a stage when a model folder does not say (the registry's ``diffusion`` fields).

    prior: cosine, x0-prediction, ``fixed_small_log``, clip 5 (normalised space); decoder: cosine, eps,
    ``learned_range``, clip 1; super_res: cosine, eps, ``fixed_small_log``, clip 1; upsampler_1024: linear, eps,
    ``fixed_small_log``, clip 1.
    """
    return diffusion_from_config(stages.stage(stage).diffusion, f"default diffusion of stage {stage!r}")


def resolve_settings(overrides: Mapping[str, StageSettings | None] | None = None) -> dict[str, StageSettings]:
    """:data:`DEFAULT_SETTINGS` with ``overrides`` (per stage; None keeps the default) applied."""
    out = dict(DEFAULT_SETTINGS)
    for name, value in (overrides or {}).items():
        if name not in STAGES:
            raise ValueError(f"settings: unknown stage {name!r}; expected one of {STAGES}")
        if value is not None:
            out[name] = value
    return out


def traced_values(settings: Mapping[str, StageSettings]) -> dict[str, jax.Array]:
    """The per-stage numbers that are inputs of the compiled program, not part of it: the guidance scales of the
    guided stages (keys ``prior``, ``decoder``), every stage's DDIM eta (``<stage>_eta``) and the autoregressive
    prior's temperature (``prior_temperature``)."""
    out = {}
    for name, s in settings.items():
        out[f"{name}_eta"] = jnp.asarray(s.eta, jnp.float32)
        if stages.stage(name).guided:
            out[name] = jnp.asarray(1.0 if s.guidance_scale is None else s.guidance_scale, jnp.float32)
    out["prior_temperature"] = jnp.asarray(settings["prior"].temperature, jnp.float32)
    return out
