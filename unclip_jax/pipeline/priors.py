"""The prior stage of the cascade (paper section 2.2): one small protocol, two kinds, chosen in one place.

Both priors turn the caption's CLIP text encodings into candidate CLIP image embeddings z_i; the cascade asks a
:class:`PriorSampler` for ``num_candidates`` per caption and keeps the one with the largest dot product z_i . z_t
(:func:`keep_best_candidate`, section 2.2: the paper draws 2). The kinds:

- :class:`DiffusionPrior` (``PriorTransformer``, diffusers' numerics): x0-prediction in the normalised embedding
  space, classifier-free guidance on a doubled batch (unconditional half: CLIP("") or the prior's learned null
  inputs), strided ancestral sampling as ``UnCLIPScheduler`` (or DDIM), then ``denormalize``.
- `unclip_jax.pipeline.ar_prior.AutoregressivePrior` (``ARPrior``): the KV-cached token sampler with its codec.

:func:`prior_sampler` picks the kind from the network's class (:data:`PRIOR_SAMPLERS`); nothing else in the cascade
distinguishes them. A sampler is a frozen dataclass of static parts only, so it is part of the hashable plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.diffusion import GaussianDiffusion, classifier_free_guidance, respace
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.pipeline.ar_prior import AutoregressivePrior
from unclip_jax.pipeline.loops import initial_noise, repeat_rows, sample_loop
from unclip_jax.pipeline.settings import StageSettings

Arrays = Mapping[str, jax.Array]


class PriorSampler(Protocol):
    """What the cascade asks of a prior.

    Attributes:
        kind: ``"diffusion"`` or ``"ar"`` (reports, ``unclip sample`` output, the loader's kind check).
        module: the network.
        num_steps: sampling steps (or tokens) of one draw (progress lines).
    """

    kind: ClassVar[str]
    module: nn.Module

    @property
    def num_steps(self) -> int: ...

    def sample_image_embeds(
        self,
        variables: Mapping[str, Any],
        text: Arrays,
        null: Arrays,
        scales: Arrays,
        key: jax.Array,
        *,
        num_candidates: int,
        return_intermediates: bool,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``num_candidates`` draws of z_i per caption.

        Args:
            variables: the prior's variables.
            text: the captions' CLIP encodings: ``text_embeds`` [B, P], ``last_hidden_state`` [B, L, W], ``mask``.
            null: the same for the empty caption ``""`` (one row).
            scales: the traced settings (`unclip_jax.pipeline.settings.traced_values`).
            key: the prior stage's key.
            num_candidates: draws per caption.
            return_intermediates: also return the draw's x_T and per-step noise (diffusion prior).

        Returns:
            ``(z [B * num_candidates, D] caption-major, extra outputs of the cascade)``.
        """
        ...


@dataclasses.dataclass(frozen=True)
class DiffusionPrior:
    """The diffusion prior (``PriorTransformer``) with its respaced diffusion and static settings."""

    kind: ClassVar[str] = "diffusion"
    network: ClassVar[type] = PriorTransformer
    module: PriorTransformer
    diffusion: GaussianDiffusion
    settings: StageSettings

    @classmethod
    def from_settings(
        cls, module: PriorTransformer, diffusion: GaussianDiffusion, settings: StageSettings
    ) -> DiffusionPrior:
        """From the training diffusion and the stage's full settings."""
        return cls(module, respace(diffusion, settings.spacing), settings.static())

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    def sample_image_embeds(self, variables, text, null, scales, key, *, num_candidates, return_intermediates):
        module, n = self.module, num_candidates
        cond = repeat_rows(
            dict(
                proj_embedding=text["text_embeds"],
                encoder_hidden_states=text["last_hidden_state"],
                attention_mask=text["mask"],
            ),
            n,
        )
        bn = text["text_embeds"].shape[0] * n
        if module.learned_null_text:
            cond["drop_text"] = jnp.zeros((bn,), bool)
            uncond = dict(cond, drop_text=jnp.ones((bn,), bool))
        else:
            uncond = dict(
                proj_embedding=jnp.broadcast_to(null["text_embeds"][:1], cond["proj_embedding"].shape),
                encoder_hidden_states=jnp.broadcast_to(
                    null["last_hidden_state"][:1], cond["encoder_hidden_states"].shape
                ),
                attention_mask=jnp.broadcast_to(null["mask"][:1], cond["attention_mask"].shape),
            )

        def denoise(x, t, **kw):
            return module.apply(variables, x, t, **kw).astype(jnp.float32)

        x_T = initial_noise(key, (bn, module.embedding_dim))
        if self.settings.guidance_scale is None:
            fn, c = denoise, cond
        else:
            fn, c = classifier_free_guidance(denoise, scales["prior"], cond, uncond), None
        res = sample_loop(self.diffusion, self.settings, fn, x_T, key, c, return_intermediates, scales["prior_eta"])
        extra = {}
        if return_intermediates:
            res, extra = res[0], {"prior_latents": x_T, "prior_noise": res[1]["noise"]}
        return module.apply(variables, res, method="denormalize"), extra


PRIOR_SAMPLERS: tuple[type, ...] = (DiffusionPrior, AutoregressivePrior)


def sampler_class(module: nn.Module) -> type:
    """The :data:`PRIOR_SAMPLERS` entry whose ``network`` ``module`` is (the one place the prior kinds are told
    apart)."""
    for cls in PRIOR_SAMPLERS:
        if isinstance(module, cls.network):
            return cls
    names = [cls.network.__name__ for cls in PRIOR_SAMPLERS]
    raise TypeError(f"prior: a {type(module).__name__} is not a prior network; expected one of {names}")


def prior_kind(module: nn.Module) -> str:
    """``"diffusion"`` (a ``PriorTransformer``) or ``"ar"`` (an `unclip_jax.models.ar_prior.ARPrior`)."""
    return sampler_class(module).kind


def prior_sampler(module: nn.Module, diffusion: GaussianDiffusion, settings: StageSettings) -> PriorSampler:
    """The :class:`PriorSampler` of a prior network, its training diffusion (unused by the AR prior) and the stage's
    settings (validated for that kind)."""
    return sampler_class(module).from_settings(module, diffusion, settings)


def keep_best_candidate(z: jax.Array, b: int, n: int, text_embeds: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Section 2.2: of the ``n`` candidates per caption (rows ``[b * n, D]``, caption-major) keep the one with the
    largest dot product with the text embedding.

    Returns:
        ``(z_i [b, D], {"candidates" [b, n, D], "candidate_scores" [b, n], "candidate_index" [b]})``.
    """
    candidates = z.reshape(b, n, -1)
    scores = jnp.einsum("bnd,bd->bn", candidates, text_embeds.astype(candidates.dtype))
    index = jnp.argmax(scores, axis=-1)
    out = {"candidates": candidates, "candidate_scores": scores, "candidate_index": index}
    return candidates[jnp.arange(b), index], out
