"""A :class:`GaussianDiffusion` from a config mapping: the one reader of ``config.diffusion`` and ``diffusion.json``.

Training (``config.diffusion`` of an experiment), a training export's ``diffusion.json`` and the stage registry's
default diffusions (:data:`unclip_jax.stages.STAGES`) all describe a diffusion with the same fields; this module
holds their defaults and builds the diffusion from them, so the two readers cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from unclip_jax.diffusion.gaussian import GaussianDiffusion
from unclip_jax.diffusion.schedules import get_named_beta_schedule

# guided-diffusion's defaults (1000 cosine steps, eps-prediction, MSE); clip_denoised <= 0 or None: no clipping;
# snr_gamma None: no Min-SNR weighting (Hang et al. 2023).
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        steps=1000,
        schedule="cosine",
        mean_type="epsilon",
        var_type="fixed_small_log",
        loss_type="mse",
        clip_denoised=1.0,
        vlb_weight=0.001,
        snr_gamma=None,
    )
)


def diffusion_from_config(config: Mapping[str, Any], where: str = "config.diffusion") -> GaussianDiffusion:
    """The diffusion described by ``config`` (fields of :data:`DEFAULTS`; missing ones take their default).

    Unknown fields other than sampling ones (``sample_steps``) are ignored, so a ``diffusion.json`` written with the
    whole ``config.diffusion`` reads back. Errors are one-line ``ValueError`` s naming ``where`` and the field.
    """
    get = {**DEFAULTS, **{k: v for k, v in dict(config).items() if k in DEFAULTS}}
    try:
        clip = get["clip_denoised"]
        gamma = get["snr_gamma"]
        return GaussianDiffusion(
            betas=get_named_beta_schedule(str(get["schedule"]), int(get["steps"])),
            model_mean_type=get["mean_type"],
            model_var_type=get["var_type"],
            loss_type=get["loss_type"],
            clip_denoised=None if clip is None or float(clip) <= 0 else float(clip),
            vlb_weight=float(get["vlb_weight"]),
            snr_gamma=None if gamma is None else float(gamma),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad diffusion config ({e})") from e
