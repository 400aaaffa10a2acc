"""The autoregressive prior as a prior of the cascade (paper section 2.2; `unclip_jax.pipeline.priors`).

The captions are repeated ``num_candidates`` times (caption-major, as for the diffusion prior) and sampled in one
call of `unclip_jax.models.ar_prior.sample` with the prior stage's key: a KV-cached scan of the model's sequence,
the unconditional branch is the model's learned null caption, guidance on the log-probabilities, temperature /
top-k / top-p on the code tokens, the dot-product token from the top half of its distribution; the codes are decoded
with the codec of the ``stats`` collection. ``steps``, ``sampler`` and ``eta`` of the stage settings do not apply.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from unclip_jax.diffusion import GaussianDiffusion
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models.ar_prior import ARPrior
from unclip_jax.pipeline.loops import repeat_rows
from unclip_jax.pipeline.settings import StageSettings


@dataclasses.dataclass(frozen=True)
class AutoregressivePrior:
    """The autoregressive prior (``ARPrior``) with the static part of its settings (guided or not, top-k, top-p)."""

    kind: ClassVar[str] = "ar"
    network: ClassVar[type] = ARPrior
    module: ARPrior
    settings: StageSettings

    @classmethod
    def from_settings(cls, module: ARPrior, diffusion: GaussianDiffusion | None, settings: StageSettings):
        """From the stage's full settings (the diffusion is not used); refuses guidance without a null caption."""
        del diffusion
        if settings.guidance_scale is not None and not module.learned_null_text:
            raise ValueError(
                "prior: this ARPrior has no learned null caption (learned_null_text=False), so it cannot be "
                "sampled with classifier-free guidance here; set the prior guidance scale to None "
                "(unclip sample --prior-guidance 0)"
            )
        guided = None if settings.guidance_scale is None else 0.0
        return cls(module, StageSettings(1, "ddpm", guidance_scale=guided, top_k=settings.top_k, top_p=settings.top_p))

    @property
    def num_steps(self) -> int:
        return self.module.num_components + 1  # k code tokens + the dot-product token

    def sample_image_embeds(self, variables, text, null, scales, key, *, num_candidates, return_intermediates):
        """See `unclip_jax.pipeline.priors.PriorSampler`; also returns the sampled tokens of every candidate:
        ``prior_codes`` [B, N, k] and ``prior_dot_tokens`` [B, N]."""
        del null, return_intermediates
        n, b = num_candidates, text["text_embeds"].shape[0]
        res = ar_lib.sample(
            self.module,
            variables,
            repeat_rows(text["last_hidden_state"], n),
            repeat_rows(text["mask"], n),
            repeat_rows(text["text_embeds"], n),
            key,
            guidance_scale=None if self.settings.guidance_scale is None else scales["prior"],
            temperature=scales["prior_temperature"],
            top_k=self.settings.top_k,
            top_p=self.settings.top_p,
        )
        extra = {"prior_codes": res["codes"].reshape(b, n, -1), "prior_dot_tokens": res["dot_tokens"].reshape(b, n)}
        return res["image_embeds"].astype(jnp.float32), extra
