"""Beta schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

API (other modules code against this):
    ``get_named_beta_schedule(name, num_timesteps) -> np.ndarray`` float64 ``[num_timesteps]``.

Names:
    * ``"cosine"`` (alias ``"squaredcos_cap_v2"``): Nichol & Dhariwal, *Improved DDPM* (2021), Sec. 3.2, eq. 17;
      ``beta_t = min(1 - abar(t+1)/abar(t), 0.999)`` with ``abar(t) = cos(((t/T) + s)/(1 + s) * pi/2)^2``, s=0.008.
      Same numbers as diffusers' ``betas_for_alpha_bar`` (``beta_schedule="squaredcos_cap_v2"``, used by
      ``UnCLIPScheduler``) and guided-diffusion's ``get_named_beta_schedule("cosine", T)``, but kept in float64.
    * ``"linear"``: Ho et al., *DDPM* (2020), Sec. 4, scaled as in guided-diffusion so that any T matches the
      T=1000 schedule: ``linspace(1e-4 * 1000/T, 0.02 * 1000/T, T)``.

Tables stay float64 numpy; `unclip_jax.diffusion.gaussian` casts them to the compute dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

COSINE_S = 0.008
MAX_BETA = 0.999


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> np.ndarray:
    """Discretises a continuous alpha_bar(t), t in [0, 1], into betas (guided-diffusion `betas_for_alpha_bar`).

    Args:
        num_timesteps: T, number of betas.
        alpha_bar: cumulative product of (1 - beta) as a function of t in [0, 1].
        max_beta: cap on each beta (avoids the singularity at t = 1).

    Returns:
        float64 ``[T]`` with ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``.
    """
    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Returns the named beta schedule.

    Args:
        name: ``"cosine"`` / ``"squaredcos_cap_v2"`` or ``"linear"`` (see the module docstring).
        num_timesteps: T >= 1.

    Returns:
        float64 numpy array ``[num_timesteps]`` of betas in (0, 1).

    Raises:
        ValueError: unknown name or non-positive number of timesteps.
    """
    if int(num_timesteps) < 1:
        raise ValueError(f"get_named_beta_schedule: num_timesteps must be >= 1, got {num_timesteps}")
    num_timesteps = int(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_timesteps, lambda t: math.cos((t + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        )
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(
        f"get_named_beta_schedule: unknown schedule name {name!r}; expected 'cosine' (= 'squaredcos_cap_v2') or 'linear'"
    )
