"""The unCLIP decoder and prior trained in PyTorch, written independently of unclip_jax (tools/train_parity.py).

- :class:`TorchDiffusion`: guided-diffusion's ``GaussianDiffusion`` tables and ``training_losses`` (Ho et al. 2020;
  Nichol & Dhariwal 2021: eps / x0 / v targets, the hybrid loss with learned-range variance and a stop-gradient on
  the mean, section 3.1; the decoder NLL L_0 with the exact normal CDF), ``make bench``'s PyTorch copy
  (:class:`unclip_jax.bench.torch_train.TorchDiffusionLoss`), which is written in PyTorch apart from unclip_jax's
  JAX code, as is everything here.
- :class:`TorchDecoder`: diffusers ``UNet2DConditionModel`` + ``UnCLIPTextProjModel`` with per-example
  classifier-free-guidance drops (paper section 2.1: z_i -> the learned embedding, caption -> the null caption).
- :class:`TorchPrior`: diffusers ``PriorTransformer`` on ``(z_i - clip_mean) / clip_std`` predicting x0 (section
  2.2), the caption dropped to learned null inputs (parameters ``null.*``) when the model has them.
- :class:`TorchTrainer`: ``torch.optim.AdamW`` (decay on tensors with ndim >= 2), ``clip_grad_norm_``, a
  ``LambdaLR`` linear warm-up from 0 then cosine decay, and an EMA with the ``min(decay, (1 + n) / (10 + n))``
  warm-up.

Parameters are named by their diffusers state-dict names with a prefix (the pipeline subfolders ``decoder.``, ``text_proj.``, ``prior.``).
A step's random draws (``t``, ``weights``, ``noise`` NHWC / [B, D], ``drop_image_embeds`` / ``drop_caption`` or
``drop_text``) come in as numpy arrays, so either side's draws can be replayed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unclip_jax.bench.torch_train import TorchDiffusionLoss, adamw, ema_decay

# guided-diffusion's tables and training_losses: one PyTorch copy for these tools and the bench.
TorchDiffusion = TorchDiffusionLoss


class TorchDecoder:
    """diffusers ``UNet2DConditionModel`` + ``UnCLIPTextProjModel`` with per-example CFG drops (paper section 2.1)."""

    def __init__(self, folder: Path, null_caption: dict[str, np.ndarray] | None):
        from diffusers import UNet2DConditionModel
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        self.unet = UNet2DConditionModel.from_pretrained(folder / "decoder").train()
        self.proj = UnCLIPTextProjModel.from_pretrained(folder / "text_proj").train()
        self.params = {"decoder." + k: p for k, p in self.unet.named_parameters()}
        self.params.update({"text_proj." + k: p for k, p in self.proj.named_parameters()})
        self.null = None if null_caption is None else {k: torch.from_numpy(v) for k, v in null_caption.items()}

    def loss(self, diffusion: TorchDiffusion, batch: dict, draws: dict):
        image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        x_start = image.float() / 127.5 - 1.0 if image.dtype == torch.uint8 else image.float()  # float: in [-1, 1]
        noise = torch.from_numpy(draws["noise"]).permute(0, 3, 1, 2)
        image_embeds = torch.from_numpy(batch["image_embeds"])
        text_embeds = torch.from_numpy(batch["text_embeds"])
        hidden = torch.from_numpy(batch["text_hidden_states"])
        mask = (
            torch.from_numpy(batch["text_mask"]) if "text_mask" in batch else torch.ones(hidden.shape[:2], dtype=bool)
        )
        drop_img = torch.from_numpy(draws["drop_image_embeds"])
        drop_cap = torch.from_numpy(draws["drop_caption"])
        image_embeds = torch.where(
            drop_img[:, None], self.proj.learned_classifier_free_guidance_embeddings, image_embeds
        )
        n = self.null
        if n is None:  # the task's fallback: zeros, only the first token visible
            n = dict(
                text_embeds=torch.zeros(1, text_embeds.shape[1]),
                text_hidden_states=torch.zeros(1, *hidden.shape[1:]),
                text_mask=torch.arange(hidden.shape[1])[None] < 1,
            )
        text_embeds = torch.where(drop_cap[:, None], n["text_embeds"], text_embeds)
        hidden = torch.where(drop_cap[:, None, None], n["text_hidden_states"], hidden)
        mask = torch.where(drop_cap[:, None], n["text_mask"], mask)
        ctx, add = self.proj(
            image_embeddings=image_embeds,
            prompt_embeds=text_embeds,
            text_encoder_hidden_states=hidden,
            do_classifier_free_guidance=False,
        )
        mask = torch.nn.functional.pad(mask, (self.proj.clip_extra_context_tokens, 0), value=True)

        def model(x_t, t):
            return self.unet(x_t, t, encoder_hidden_states=ctx, class_labels=add, attention_mask=mask).sample

        t = torch.from_numpy(draws["t"]).long()
        per_example = diffusion.training_losses(model, x_start, t, noise)
        return (per_example * torch.from_numpy(draws["weights"])).mean()


class TorchPrior:
    """diffusers ``PriorTransformer`` on ``(z_i - clip_mean) / clip_std`` with a learned null caption (section 2.2)."""

    def __init__(self, folder: Path, null_params: dict[str, np.ndarray]):
        from diffusers import PriorTransformer

        self.prior = PriorTransformer.from_pretrained(folder / "prior").train()
        self.prior.clip_mean.requires_grad_(False)
        self.prior.clip_std.requires_grad_(False)
        self.params = {"prior." + k: p for k, p in self.prior.named_parameters() if p.requires_grad}
        self.null = {
            "null." + k[len("null_") :]: torch.nn.Parameter(torch.from_numpy(np.array(v)))
            for k, v in null_params.items()
        }
        self.params.update(self.null)

    def loss(self, diffusion: TorchDiffusion, batch: dict, draws: dict):
        z = torch.from_numpy(batch["image_embeds"])
        x_start = (z - self.prior.clip_mean.detach()) / self.prior.clip_std.detach()
        drop = torch.from_numpy(draws["drop_text"])
        text_embeds = torch.from_numpy(batch["text_embeds"])
        hidden = torch.from_numpy(batch["text_hidden_states"])
        mask = torch.from_numpy(batch["text_mask"])
        if self.null:
            text_embeds = torch.where(drop[:, None], self.null["null.text_embedding"], text_embeds)
            hidden = torch.where(drop[:, None, None], self.null["null.encoder_hidden_states"], hidden)
            mask = torch.where(drop[:, None], torch.ones_like(mask), mask)

        def model(x_t, t):
            return self.prior(
                x_t, t, proj_embedding=text_embeds, encoder_hidden_states=hidden, attention_mask=mask
            ).predicted_image_embedding

        t = torch.from_numpy(draws["t"]).long()
        per_example = diffusion.training_losses(model, x_start, t, torch.from_numpy(draws["noise"]))
        return (per_example * torch.from_numpy(draws["weights"])).mean()


class TorchTrainer:
    """AdamW (decay on matrices / kernels / embeddings, ndim >= 2), global-norm clipping, linear warm-up from 0 then
    cosine decay, and an EMA of the parameters."""

    def __init__(self, model: TorchDecoder | TorchPrior, diffusion: TorchDiffusion, config: Any):
        self.model, self.diffusion = model, diffusion
        o = config.optim
        params = model.params
        self.opt = adamw(list(params.values()), o)
        warmup, total = int(o.warmup_steps), int(config.total_steps)
        decay = int(o.decay_steps) or max(1, total - warmup)
        end = float(o.end_lr_factor)
        if o.schedule not in ("constant", "cosine"):
            raise ValueError(f"train_parity: schedule {o.schedule!r}")

        def factor(n: int) -> float:  # n = updates done so far
            if n < warmup:
                return n / warmup
            if o.schedule == "constant":
                return 1.0
            k = min(n - warmup, decay)
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * k / decay))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.clip = float(o.grad_clip_norm)
        self.ema_decay, self.ema_warmup = float(config.ema.decay), bool(config.ema.warmup)
        self.ema = {k: p.detach().clone() for k, p in params.items()}
        self.step = 0

    def grads(self, batch: dict, draws: dict) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients (before clipping) at the current parameters."""
        self.opt.zero_grad(set_to_none=False)
        loss = self.model.loss(self.diffusion, batch, draws)
        loss.backward()
        return loss.item(), {k: p.grad.detach().numpy().copy() for k, p in self.model.params.items()}

    def train_step(self, batch: dict, draws: dict) -> dict[str, float]:
        lr = self.opt.param_groups[0]["lr"]
        loss, _ = self.grads(batch, draws)
        params = list(self.model.params.values())
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.opt.step()
        self.sched.step()
        n = self.step
        d = np.float32(ema_decay(n, self.ema_decay, self.ema_warmup))
        with torch.no_grad():
            for k, p in self.model.params.items():
                self.ema[k].mul_(float(d)).add_(p, alpha=float(np.float32(1) - d))
        self.step += 1
        return {"loss": loss, "grad_norm": float(norm), "lr": lr}

    def named(self, which: str) -> dict[str, np.ndarray]:
        src = self.ema if which == "ema" else {k: p.detach() for k, p in self.model.params.items()}
        return {k: v.numpy().copy() for k, v in src.items()}


def draws_like(shape: tuple, num_timesteps: int, probs: dict[str, float], generator: torch.Generator) -> dict:
    """A step's own draws from ``generator``: ``t`` uniform in [0, T), ``weights`` 1, standard normal ``noise`` of
    ``shape`` (NHWC / [B, D]) and a Bernoulli mask per entry of ``probs`` (e.g. ``{"drop_caption": 0.5}``)."""
    b = shape[0]
    out = dict(
        t=torch.randint(0, num_timesteps, (b,), generator=generator).numpy().astype(np.int32),
        weights=np.ones(b, np.float32),
        noise=torch.randn(tuple(shape), generator=generator).numpy(),
    )
    for name, p in probs.items():
        out[name] = (torch.rand(b, generator=generator) < p).numpy()
    return out
