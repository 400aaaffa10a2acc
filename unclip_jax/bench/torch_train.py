"""The training work of our train step, written for PyTorch, so that the bench's diffusers side does the same work.

- :class:`TorchDiffusionLoss`: guided-diffusion's ``GaussianDiffusion`` tables and per-example ``training_losses``
  for L_simple (epsilon / x0 / v targets) and the hybrid loss with learned-range variance (Nichol & Dhariwal 2021,
  section 3.1: L_simple + lambda L_vlb, the VLB term training only the variance through a stop-gradient on the
  mean), as :mod:`unclip_jax.diffusion` computes it for the decoder.
- :func:`adamw`: ``torch.optim.AdamW`` with weight decay on tensors with ndim >= 2 only
  (:func:`unclip_jax.train.optim.decay_mask`).
- :func:`ema_update`: ``ema <- d * ema + (1 - d) * params`` in place over every tensor
  (:func:`unclip_jax.train.state.ema_update`), with the ``min(decay, (1 + n) / (10 + n))`` warm-up.

The one PyTorch copy of this training maths, written independently of :mod:`unclip_jax.diffusion` and
:mod:`unclip_jax.train`: the bench times it, and ``tools/torch_unclip.py`` (the differential training reference of
``tools/train_parity.py``) trains with it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def betas_for(schedule: str, steps: int) -> np.ndarray:
    """Improved DDPM's cosine betas (eq. 17, capped at 0.999) or DDPM's linear ones, float64."""
    if schedule == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    raise ValueError(f"PyTorch side: schedule {schedule!r}")


class TorchDiffusionLoss:
    """guided-diffusion's ``training_losses`` (MSE on eps / x0; hybrid with learned-range variance) in PyTorch."""

    def __init__(self, cfg: Any):
        import torch

        if cfg.get("snr_gamma", None) is not None:
            raise ValueError("PyTorch side: config.diffusion.snr_gamma is not reproduced")
        self.torch = torch
        steps = int(cfg.steps)
        betas = betas_for(cfg.schedule, steps)
        self.num_timesteps = steps
        self.mean_type, self.var_type, self.loss_type = cfg.mean_type, cfg.var_type, cfg.loss_type
        self.vlb_weight = float(cfg.vlb_weight)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = dict(
            betas=betas,
            sqrt_ac=np.sqrt(ac),
            sqrt_1m_ac=np.sqrt(1.0 - ac),
            sqrt_recip_ac=np.sqrt(1.0 / ac),
            sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1),
            post_log_var=np.log(np.append(post_var[1], post_var[1:])),
            coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        )
        self.tables = {k: torch.from_numpy(v).float() for k, v in tables.items()}

    def extract(self, name: str, t: Any, ndim: int) -> Any:
        out = self.tables[name][t]
        return out.reshape(out.shape + (1,) * (ndim - 1))

    def training_losses(self, model: Any, x_start: Any, t: Any, noise: Any) -> Any:
        """Per-example loss [B] of ``model(x_t, t)`` (channels on axis 1; learned range: the mean part first)."""
        torch = self.torch
        n = x_start.ndim
        x_t = self.extract("sqrt_ac", t, n) * x_start + self.extract("sqrt_1m_ac", t, n) * noise
        out = model(x_t, t)
        c = x_start.shape[1]
        var_values = None
        if self.var_type == "learned_range":
            out, var_values = out[:, :c], out[:, c:]
        target = {"epsilon": noise, "x_start": x_start}.get(self.mean_type)
        if self.mean_type == "v":  # Salimans & Ho 2022: v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0
            target = self.extract("sqrt_ac", t, n) * noise - self.extract("sqrt_1m_ac", t, n) * x_start
        dims = tuple(range(1, n))
        mse = ((target - out) ** 2).mean(dim=dims)
        if self.loss_type == "mse":
            return mse
        if self.loss_type != "hybrid" or var_values is None or self.mean_type != "epsilon":
            raise ValueError("PyTorch side: the hybrid loss is written for epsilon + learned_range only")
        eps = out.detach()  # the VLB trains only the variance
        pred_xstart = self.extract("sqrt_recip_ac", t, n) * x_t - self.extract("sqrt_recipm1_ac", t, n) * eps
        model_mean = self.extract("coef1", t, n) * pred_xstart + self.extract("coef2", t, n) * x_t
        min_log = self.extract("post_log_var", t, n)
        max_log = torch.log(self.extract("betas", t, n))
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        true_mean = self.extract("coef1", t, n) * x_start + self.extract("coef2", t, n) * x_t
        kl = 0.5 * (
            -1.0
            + model_log_var
            - min_log
            + torch.exp(min_log - model_log_var)
            + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
        )
        kl = kl.mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var).mean(dim=dims)
        vb = torch.where(t == 0, nll / math.log(2.0), kl)
        return mse + self.vlb_weight * self.num_timesteps * vb


def discretized_gaussian_log_likelihood(x: Any, means: Any, log_scales: Any) -> Any:
    """guided-diffusion's L_0 likelihood of 256-level data in [-1, 1] (exact normal CDF)."""
    import torch

    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(delta.clamp(min=1e-12))),
    )


def adamw(params: list[Any], optim_cfg: Any) -> Any:
    """``torch.optim.AdamW`` with ``config.optim``'s settings, decay on ndim >= 2 tensors only."""
    import torch

    o = optim_cfg
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(o.weight_decay)},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps))


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """EMA decay after ``step`` updates: ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def ema_update(ema: list[Any], params: list[Any], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * params`` in place over every tensor."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            e.mul_(decay).add_(p, alpha=1.0 - decay)
