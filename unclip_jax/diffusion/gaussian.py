"""Gaussian diffusion: forward process, posterior, parameterisations, p(x_{t-1}|x_t) and training losses.

The maths follows guided-diffusion's ``gaussian_diffusion.py`` (Ho et al. 2020, *DDPM*; Nichol & Dhariwal 2021,
*Improved DDPM*) and the numbers follow diffusers' ``UnCLIPScheduler`` / ``DDIMScheduler`` (Karlo).

API decisions (other modules code against these):
    * ``GaussianDiffusion(betas, model_mean_type, model_var_type, loss_type, clip_denoised, vlb_weight,
      timestep_map)`` is an immutable object; all tables are float64 numpy arrays and are cast to the compute
      dtype (``result_type(x.dtype, float32)``) at use, so inside ``jit`` they are constants. Equality and hash are by
      value, so it may also be a static argument of ``jit``. ``dataclasses.replace(d, clip_denoised=None)`` works.
    * ``t`` given to every method is an **index into this object's tables** (0 .. num_timesteps-1), int ``[B]`` or a
      scalar. For an un-respaced diffusion that is the timestep itself. ``denoise_fn`` always receives
      ``model_timesteps(t)``: int32 ``[B]`` in the ORIGINAL (training) numbering (see `respace.respace`).
    * ``denoise_fn(x_t, t, **cond) -> model_output``. Data may be images ``[B, H, W, C]`` (NHWC) or vectors ``[B, D]``
      (prior embeddings): everything operates on the LAST axis as channels and reduces over all but the first.
      With ``model_var_type="learned_range"`` the output has ``2 * C`` channels on the last axis: the mean
      parameterisation (eps / x_start / v) first, then the variance values ``v`` in [-1, 1]
      (Improved DDPM eq. 15: ``log var = frac * log beta_t + (1 - frac) * log beta~_t``, ``frac = (v + 1) / 2``).
    * ``p_mean_variance`` returns ``dict(mean, variance, log_variance, pred_xstart, eps, model_eps)``:
      ``pred_xstart`` clipped to ``[-clip_denoised, clip_denoised]`` (no clipping when ``clip_denoised is None``),
      ``eps`` the noise consistent with the clipped ``pred_xstart`` (guided-diffusion / GLIDE DDIM),
      ``model_eps`` the unclipped noise implied by the raw model output (diffusers DDIM default).
    * ``training_losses`` returns per-example ``loss``, ``mse``, ``vb`` (each ``[B]``): ``vb`` is the VLB term L_t in
      bits/dim computed with a stop-gradient on the mean (Improved DDPM Sec. 3.1), L_0 being the discretised
      Gaussian decoder NLL; ``loss = mse`` for ``loss_type="mse"`` and
      ``loss = mse + vlb_weight * num_timesteps * vb`` for ``"hybrid"`` (L_hybrid = L_simple + lambda L_vlb with
      L_vlb = sum_t L_t estimated by T * L_t; lambda = 0.001 and T = 1000 give guided-diffusion's ``mse + vb``,
      and for other T guided-diffusion's ``RESCALED_MSE``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

MeanType = Literal["epsilon", "x_start", "v"]
VarType = Literal["fixed_small", "fixed_large", "fixed_small_log", "learned_range"]
LossType = Literal["mse", "hybrid"]

MEAN_TYPES = ("epsilon", "x_start", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "fixed_small_log", "learned_range")
LOSS_TYPES = ("mse", "hybrid")

DenoiseFn = Callable[..., jax.Array]


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the first (batch): ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (guided-diffusion `normal_kl`)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise.

    DDPM Sec. 3.3 (the decoder L_0) as in guided-diffusion's ``discretized_gaussian_log_likelihood``: bins of
    half-width 1/255, the edge bins extended to -inf / +inf. Uses the exact normal CDF (``jax.scipy.special.ndtr`` /
    ``log_ndtr``) instead of guided-diffusion's tanh approximation.

    Args:
        x: targets in [-1, 1] (already on the 256-level grid), any shape.
        means, log_scales: same shape as ``x``; log of the standard deviation.

    Returns:
        log-probabilities in nats, same shape as ``x``.
    """
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-min_in)
    # Difference of CDFs computed on the side of the mean where it does not cancel.
    mid = 0.5 * (plus_in + min_in)
    delta = jnp.where(
        mid > 0,
        jax.scipy.special.ndtr(-min_in) - jax.scipy.special.ndtr(-plus_in),
        jax.scipy.special.ndtr(plus_in) - jax.scipy.special.ndtr(min_in),
    )
    log_cdf_delta = jnp.log(jnp.maximum(delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GaussianDiffusion.{field}={value!r}; expected one of {choices}")


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with a network given as a callable (guided-diffusion `GaussianDiffusion`).

    Attributes:
        betas: float64 ``[T]`` forward-process variances (see `schedules.get_named_beta_schedule`).
        model_mean_type: what the network predicts: ``"epsilon"``, ``"x_start"`` (diffusers ``"sample"``) or
            ``"v"`` (Salimans & Ho 2022, ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``).
        model_var_type: ``"fixed_small"`` (posterior variance beta~_t, guided-diffusion's clipped log),
            ``"fixed_large"`` (beta_t, first entry beta~_1), ``"fixed_small_log"`` (beta~_t with
            ``log(max(beta~_t, 1e-20))``, diffusers/Karlo), or ``"learned_range"`` (Improved DDPM eq. 15).
        loss_type: ``"mse"`` (L_simple on the mean parameterisation) or ``"hybrid"`` (needs ``learned_range``).
        clip_denoised: clip predicted x_0 to ``[-clip_denoised, clip_denoised]`` when sampling; ``None`` disables.
            (Karlo: 5.0 for the prior, 1.0 for decoder and upsamplers.)
        vlb_weight: lambda of L_hybrid (Improved DDPM Sec. 3.1, 0.001).
        timestep_map: for a respaced diffusion, the original timestep of each table index (``None``: identity).
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
            Weighting Strategy"; diffusers' ``snr_gamma``): the MSE term of each example is multiplied by
            `min_snr_weight` (``None``: unweighted L_simple). Applies to the training loss only.
    """

    betas: np.ndarray
    model_mean_type: MeanType = "epsilon"
    model_var_type: VarType = "fixed_small"
    loss_type: LossType = "mse"
    clip_denoised: float | None = 1.0
    vlb_weight: float = 0.001
    timestep_map: tuple[int, ...] | None = None
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        _check_choice("model_mean_type", self.model_mean_type, MEAN_TYPES)
        _check_choice("model_var_type", self.model_var_type, VAR_TYPES)
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        if self.loss_type == "hybrid" and self.model_var_type != "learned_range":
            raise ValueError(
                "GaussianDiffusion.loss_type='hybrid' trains the variance through the VLB and needs "
                f"model_var_type='learned_range', got {self.model_var_type!r}"
            )
        if self.clip_denoised is not None and not float(self.clip_denoised) > 0:
            raise ValueError(
                f"GaussianDiffusion.clip_denoised must be a positive range or None, got {self.clip_denoised}"
            )
        if self.snr_gamma is not None and not float(self.snr_gamma) > 0:
            raise ValueError(f"GaussianDiffusion.snr_gamma must be positive or None, got {self.snr_gamma}")
        betas = np.array(self.betas, dtype=np.float64).reshape(-1)
        if betas.size == 0 or not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("GaussianDiffusion.betas must be a non-empty 1-D array with values in (0, 1]")
        betas.setflags(write=False)
        object.__setattr__(self, "betas", betas)
        n = betas.shape[0]
        tmap = tuple(range(n)) if self.timestep_map is None else tuple(int(i) for i in self.timestep_map)
        if len(tmap) != n:
            raise ValueError(f"GaussianDiffusion.timestep_map has {len(tmap)} entries for {n} betas")
        object.__setattr__(self, "timestep_map", tmap)

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        first = posterior_variance[1] if n > 1 else betas[0]
        with np.errstate(divide="ignore"):
            tables = dict(
                alphas=alphas,
                alphas_cumprod=alphas_cumprod,
                alphas_cumprod_prev=alphas_cumprod_prev,
                alphas_cumprod_next=alphas_cumprod_next,
                sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
                sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
                posterior_variance=posterior_variance,
                # log of beta~_t with beta~_0 (= 0) replaced by beta~_1 (guided-diffusion).
                posterior_log_variance_clipped=np.log(np.append(first, posterior_variance[1:])),
                # diffusers fixed_small_log: log(clamp(beta~_t, 1e-20)).
                posterior_log_variance_floored=np.log(np.maximum(posterior_variance, 1e-20)),
                posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
                log_betas=np.log(betas),
                fixed_large_variance=np.append(first, betas[1:]),
                timestep_map_array=np.asarray(tmap, dtype=np.int32),
                snr=alphas_cumprod / (1.0 - alphas_cumprod),
            )
        for name, table in tables.items():
            table.setflags(write=False)
            object.__setattr__(self, name, table)

    # ------------------------------------------------------------------ identity
    def _key(self) -> tuple:
        return (
            self.betas.tobytes(),
            self.model_mean_type,
            self.model_var_type,
            self.loss_type,
            None if self.clip_denoised is None else float(self.clip_denoised),
            float(self.vlb_weight),
            self.timestep_map,
            None if self.snr_gamma is None else float(self.snr_gamma),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GaussianDiffusion) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, model_mean_type={self.model_mean_type!r}, "
            f"model_var_type={self.model_var_type!r}, loss_type={self.loss_type!r}, "
            f"clip_denoised={self.clip_denoised}, respaced={self.timestep_map != tuple(range(self.num_timesteps))})"
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def learned_variance(self) -> bool:
        return self.model_var_type == "learned_range"

    def min_snr_weight(self, t: jax.Array) -> jax.Array:
        """Min-SNR-gamma weight of the MSE term at table indices ``t`` (float32 ``[B]``; ones without ``snr_gamma``).

        With SNR_t = abar_t / (1 - abar_t) the weight on the x_0 error is ``min(SNR_t, gamma)`` (Hang et al. 2023,
        eq. 8); expressed on the error of this object's parameterisation it is ``min(SNR, gamma) / SNR`` for epsilon,
        ``min(SNR, gamma)`` for x_start and ``min(SNR, gamma) / (SNR + 1)`` for v, as in diffusers'
        ``train_text_to_image.py`` (``compute_snr``).
        """
        t = jnp.asarray(t)
        if self.snr_gamma is None:
            return jnp.ones(t.shape, jnp.float32)
        snr = jnp.asarray(self.snr, jnp.float32)[t]
        clipped = jnp.minimum(snr, jnp.float32(self.snr_gamma))
        if self.model_mean_type == "epsilon":
            return clipped / snr
        if self.model_mean_type == "x_start":
            return clipped
        return clipped / (snr + 1.0)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _dtype(x: jax.Array) -> Any:
        return jnp.result_type(jnp.asarray(x).dtype, jnp.float32)

    def extract_into_tensor(self, table: np.ndarray, t: jax.Array, x: jax.Array) -> jax.Array:
        """``table[t]`` cast to x's compute dtype, shaped to broadcast against ``x`` (t: scalar or ``[B]``).

        guided-diffusion's ``_extract_into_tensor``; the samplers of :mod:`unclip_jax.diffusion.sampling` use it too.
        """
        v = jnp.asarray(table, dtype=self._dtype(x))[jnp.asarray(t)]
        return v.reshape(v.shape + (1,) * (jnp.ndim(x) - v.ndim))

    def model_timesteps(self, t: jax.Array, batch_size: int | None = None) -> jax.Array:
        """Original (network) timesteps for table indices ``t``: int32 ``[B]`` (``batch_size`` broadcasts a scalar)."""
        out = jnp.asarray(self.timestep_map_array)[jnp.asarray(t)]
        if batch_size is not None:
            out = jnp.broadcast_to(out, (batch_size,))
        return out.astype(jnp.int32)

    def _clip(self, x: jax.Array, clip_denoised: float | None) -> jax.Array:
        return x if clip_denoised is None else jnp.clip(x, -clip_denoised, clip_denoised)

    def split_model_output(self, model_output: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Splits a learned-range output ``[..., 2C]`` into (mean part ``[..., C]``, variance values ``[..., C]``).

        Returns ``(model_output, None)`` for fixed variances. Raises ValueError on a shape mismatch.
        """
        c = x_t.shape[-1]
        if self.learned_variance:
            if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * c:
                raise ValueError(
                    f"learned_range: denoise_fn output shape {model_output.shape} must be x_t's {x_t.shape} "
                    f"with 2*{c} channels on the last axis (mean part then variance values)"
                )
            return model_output[..., :c], model_output[..., c:]
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"{self.model_var_type}: denoise_fn output shape {model_output.shape} must equal x_t's {x_t.shape}"
            )
        return model_output, None

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4).

        Returns:
            (mean like x_start, variance and log_variance broadcastable to x_start).
        """
        mean = self.extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self.extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self.extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPM eq. 4; diffusers ``add_noise``)."""
        return (
            self.extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM eqs. 6-7).

        Returns:
            (posterior mean like x_t, posterior variance, clipped log variance (beta~_0 -> beta~_1)).
        """
        mean = (
            self.extract_into_tensor(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract_into_tensor(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract_into_tensor(self.posterior_variance, t, x_t)
        log_variance = self.extract_into_tensor(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations
    def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (DDPM eq. 15 rearranged)."""
        return (
            self.extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
        """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)."""
        return (
            self.extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / self.extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def predict_v(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4; the ``v`` training target)."""
        return (
            self.extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self.extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def predict_xstart_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (
            self.extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
        return (
            self.extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * v
            + self.extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )

    def output_to_xstart_eps(self, mean_output: jax.Array, x_t: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Converts the (mean part of the) model output to unclipped (pred_xstart, eps)."""
        if self.model_mean_type == "epsilon":
            return self.predict_xstart_from_eps(x_t, t, mean_output), mean_output
        if self.model_mean_type == "x_start":
            return mean_output, self.predict_eps_from_xstart(x_t, t, mean_output)
        return self.predict_xstart_from_v(x_t, t, mean_output), self.predict_eps_from_v(x_t, t, mean_output)

    # ------------------------------------------------------------------ reverse process
    def model_log_variance(
        self, t: jax.Array, x_t: jax.Array, var_values: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(variance, log_variance) of p(x_{t-1} | x_t) for this ``model_var_type`` (Improved DDPM Sec. 3.1)."""
        if self.model_var_type == "learned_range":
            if var_values is None:
                raise ValueError("learned_range needs the variance values of the model output")
            min_log = self.extract_into_tensor(self.posterior_log_variance_clipped, t, x_t)
            max_log = self.extract_into_tensor(self.log_betas, t, x_t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            return jnp.exp(log_variance), log_variance
        if self.model_var_type == "fixed_small":
            return self.extract_into_tensor(self.posterior_variance, t, x_t), self.extract_into_tensor(
                self.posterior_log_variance_clipped, t, x_t
            )
        if self.model_var_type == "fixed_small_log":
            log_variance = self.extract_into_tensor(self.posterior_log_variance_floored, t, x_t)
            return jnp.exp(log_variance), log_variance
        variance = self.fixed_large_variance
        return self.extract_into_tensor(variance, t, x_t), self.extract_into_tensor(np.log(variance), t, x_t)

    def output_mean_variance(
        self, model_output: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: float | None | str = "default"
    ) -> dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from a given model output (guided-diffusion ``p_mean_variance`` after the model call).

        Args:
            model_output: ``denoise_fn`` output for (x_t, t).
            x_t: ``[B, ..., C]``.
            t: table indices, ``[B]`` or scalar.
            clip_denoised: override of ``self.clip_denoised`` (``"default"`` keeps it).

        Returns:
            dict(mean, variance, log_variance, pred_xstart, eps, model_eps); see the module docstring.
        """
        clip = self.clip_denoised if isinstance(clip_denoised, str) else clip_denoised
        mean_output, var_values = self.split_model_output(model_output, x_t)
        raw_xstart, model_eps = self.output_to_xstart_eps(mean_output, x_t, t)
        pred_xstart = self._clip(raw_xstart, clip)
        eps = model_eps if clip is None else self.predict_eps_from_xstart(x_t, t, pred_xstart)
        variance, log_variance = self.model_log_variance(t, x_t, var_values)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        shape = x_t.shape
        return dict(
            mean=mean,
            variance=jnp.broadcast_to(variance, shape),
            log_variance=jnp.broadcast_to(log_variance, shape),
            pred_xstart=pred_xstart,
            eps=eps,
            model_eps=model_eps,
        )

    def p_mean_variance(self, denoise_fn: DenoiseFn, x_t: jax.Array, t: jax.Array, **cond: Any) -> dict[str, jax.Array]:
        """Calls ``denoise_fn(x_t, model_timesteps(t), **cond)`` and returns `output_mean_variance` of it."""
        t_model = self.model_timesteps(t, x_t.shape[0])
        return self.output_mean_variance(denoise_fn(x_t, t_model, **cond), x_t, t)

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(
        self, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> dict[str, jax.Array]:
        """The VLB term L_t in bits/dim per example (DDPM eq. 5; guided-diffusion ``_vb_terms_bpd``).

        L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and the discretised Gaussian decoder NLL
        -log p(x_0|x_1) for t == 0 (``x_start`` must be in [-1, 1] on the 256-level grid for L_0 to be a
        likelihood). The model's prediction of x_0 is NOT clipped here.

        Returns:
            dict(output ``[B]`` bits/dim, kl ``[B]``, decoder_nll ``[B]``, pred_xstart).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.output_mean_variance(model_output, x_t, t, clip_denoised=None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        t_b = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
        return dict(
            output=jnp.where(t_b == 0, decoder_nll, kl), kl=kl, decoder_nll=decoder_nll, pred_xstart=out["pred_xstart"]
        )

    def training_losses(
        self, denoise_fn: DenoiseFn, x_start: jax.Array, t: jax.Array, noise: jax.Array, **cond: Any
    ) -> dict[str, jax.Array]:
        """Per-example training losses (guided-diffusion ``training_losses`` for MSE / hybrid).

        Args:
            denoise_fn: the network, ``denoise_fn(x_t, t_model, **cond)``.
            x_start: clean data ``[B, ...]``.
            t: table indices ``[B]`` (see `timesteps.sample_timesteps`).
            noise: standard normal, like ``x_start``.
            **cond: passed to ``denoise_fn``.

        Returns:
            dict(loss, mse, vb) each ``[B]`` float32 (see module docstring), plus x_t and model_output.
        """
        x_t = self.q_sample(x_start, t, noise)
        model_output = denoise_fn(x_t, self.model_timesteps(t, x_start.shape[0]), **cond)
        mean_output, var_values = self.split_model_output(model_output, x_t)
        if self.model_mean_type == "epsilon":
            target = noise
        elif self.model_mean_type == "x_start":
            target = x_start
        else:
            target = self.predict_v(x_start, t, noise)
        mse = mean_flat((target.astype(jnp.float32) - mean_output.astype(jnp.float32)) ** 2)
        # Stop-gradient on the mean: the VLB trains only the variance (Improved DDPM Sec. 3.1).
        frozen = jax.lax.stop_gradient(mean_output)
        if var_values is not None:
            frozen = jnp.concatenate([frozen, var_values], axis=-1)
        vb = self.vb_terms_bpd(frozen.astype(jnp.float32), x_start.astype(jnp.float32), x_t.astype(jnp.float32), t)[
            "output"
        ]
        weighted = mse * self.min_snr_weight(t)  # ones without snr_gamma
        loss = weighted + self.vlb_weight * self.num_timesteps * vb if self.loss_type == "hybrid" else weighted
        return dict(loss=loss, mse=mse, vb=vb, x_t=x_t, model_output=model_output)
