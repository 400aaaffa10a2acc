"""diffusers ``UnCLIPScheduler`` configs <-> our diffusion config fields (``config.diffusion`` / ``diffusion.json``).

A Karlo pipeline folder describes each stage's training diffusion in ``<stage>_scheduler/scheduler_config.json``
(``UnCLIPScheduler``: ``num_train_timesteps``, ``beta_schedule``, ``prediction_type``, ``variance_type``,
``clip_sample`` / ``clip_sample_range``); we describe it with the fields of
:func:`unclip_jax.diffusion.diffusion_from_config`. The two functions here translate between them, and Karlo's
scheduler configs are those of the stage registry's default diffusions (:data:`unclip_jax.stages.STAGES`, paper
appendix C), so the facts are written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unclip_jax import stages
from unclip_jax.convert import io
from unclip_jax.diffusion.config import DEFAULTS

SCHEDULER_CONFIG = "scheduler_config.json"
SCHEDULER_CLASS = "UnCLIPScheduler"
# our field value -> diffusers' (schedule -> beta_schedule, mean_type -> prediction_type).
_BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
_PREDICTION_TYPES = {"epsilon": "epsilon", "x_start": "sample"}
_VARIANCE_TYPES = ("fixed_small_log", "learned_range")


def scheduler_config(diffusion: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UnCLIPScheduler`` config of a diffusion given by ``config.diffusion`` fields (missing: defaults)."""
    d = {**DEFAULTS, **diffusion}
    for field, value, choices in (
        ("schedule", d["schedule"], _BETA_SCHEDULES),
        ("mean_type", d["mean_type"], _PREDICTION_TYPES),
        ("var_type", d["var_type"], _VARIANCE_TYPES),
    ):
        if value not in choices:
            raise io.ConversionError(f"{SCHEDULER_CLASS} has no equivalent of {field}={value!r}")
    clip = d["clip_denoised"]
    clipped = clip is not None and float(clip) > 0
    return {
        "_class_name": SCHEDULER_CLASS,
        "_diffusers_version": io.DIFFUSERS_VERSION,
        "num_train_timesteps": int(d["steps"]),
        "beta_schedule": _BETA_SCHEDULES[d["schedule"]],
        "prediction_type": _PREDICTION_TYPES[d["mean_type"]],
        "variance_type": d["var_type"],
        "clip_sample": clipped,
        "clip_sample_range": float(clip) if clipped else 1.0,
    }


def diffusion_config(scheduler: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``config.diffusion`` fields of an ``UnCLIPScheduler`` config (diffusers' defaults for missing fields).

    Raises:
      ConversionError: naming ``where`` and the unsupported field.
    """
    beta = scheduler.get("beta_schedule", "squaredcos_cap_v2")
    schedule = {v: k for k, v in _BETA_SCHEDULES.items()}.get(beta)
    if schedule is None:
        raise io.ConversionError(f"{where}: beta_schedule {beta!r} is not supported")
    prediction = scheduler.get("prediction_type", "epsilon")
    mean = {v: k for k, v in _PREDICTION_TYPES.items()}.get(prediction)
    if mean is None:
        raise io.ConversionError(f"{where}: prediction_type {prediction!r} is not supported")
    var = scheduler.get("variance_type", "fixed_small_log")
    if var not in _VARIANCE_TYPES:
        raise io.ConversionError(f"{where}: variance_type {var!r} is not supported")
    clip = float(scheduler.get("clip_sample_range", 1.0)) if scheduler.get("clip_sample", True) else None
    steps = int(scheduler.get("num_train_timesteps", 1000))
    return dict(steps=steps, schedule=schedule, mean_type=mean, var_type=var, clip_denoised=clip)


def karlo_scheduler_configs() -> dict[str, dict[str, Any]]:
    """``<subfolder>: config`` of Karlo's schedulers: the default diffusion of every stage that has one."""
    return {s.scheduler: scheduler_config(s.diffusion) for s in stages.STAGES if s.scheduler}
