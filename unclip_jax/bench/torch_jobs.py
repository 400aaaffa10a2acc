"""The PyTorch side of the bench: diffusers' networks and ``UnCLIPPipeline`` on the weights our jobs wrote.

A train step does the work of ours (:mod:`unclip_jax.bench.torch_train`): the network's forward/backward on the
same batch shapes with our task's loss (L_simple on eps / x0; the decoder's hybrid loss with the learned-variance
VLB term and its classifier-free guidance drops), AdamW with our experiment's settings (decay on ndim >= 2),
global-norm clipping and the EMA update. The cascade is diffusers' ``UnCLIPPipeline``
with every stage's default sampling settings from :mod:`unclip_jax.stages`.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unclip_jax import stages
from unclip_jax.bench import workloads
from unclip_jax.bench.measure import job_footer, median_time, timing, torch_flops, torch_module


def text_proj_class() -> type:
    """diffusers' ``UnCLIPTextProjModel`` (under ``pipelines.deprecated`` from diffusers 0.36 on)."""
    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:  # diffusers < 0.36 kept unCLIP outside ``deprecated``
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    return UnCLIPTextProjModel


def _prior_loss(folder: Path, config: Any) -> tuple[list[Any], Callable]:
    import torch
    from diffusers import PriorTransformer

    model = PriorTransformer.from_pretrained(folder)
    model.clip_mean.requires_grad_(False)
    model.clip_std.requires_grad_(False)

    def loss(b, draws, diffusion):
        x_start = (b["image_embeds"] - model.clip_mean) / model.clip_std  # x0 in the prior's normalised space
        drop = draws["drop_text"]
        text_embeds = torch.where(drop[:, None], torch.zeros_like(b["text_embeds"]), b["text_embeds"])
        hidden = torch.where(drop[:, None, None], torch.zeros_like(b["text_hidden_states"]), b["text_hidden_states"])

        def net(x_t, t):
            return model(
                x_t, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=hidden, attention_mask=b["text_mask"]
            ).predicted_image_embedding

        return diffusion.training_losses(net, x_start, draws["t"], draws["noise"])

    return [model], loss


def _decoder_loss(folder: Path, config: Any) -> tuple[list[Any], Callable]:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "decoder")
    proj = text_proj_class().from_pretrained(folder / "text_proj")

    def loss(b, draws, diffusion):
        # Classifier-free guidance drops (paper section 2.1): z_i -> the learned embedding, caption -> the null
        # caption (the task's fallback: zeros, only the first token visible).
        drop_img, drop_cap = draws["drop_image_embeds"], draws["drop_caption"]
        image_embeds = torch.where(
            drop_img[:, None], proj.learned_classifier_free_guidance_embeddings, b["image_embeds"]
        )
        text_embeds = torch.where(drop_cap[:, None], torch.zeros_like(b["text_embeds"]), b["text_embeds"])
        hidden = torch.where(
            drop_cap[:, None, None], torch.zeros_like(b["text_hidden_states"]), b["text_hidden_states"]
        )
        first = torch.arange(hidden.shape[1])[None] < 1
        mask = torch.where(drop_cap[:, None], first, b["text_mask"])
        ctx, add_t = proj(
            image_embeddings=image_embeds,
            prompt_embeds=text_embeds,
            text_encoder_hidden_states=hidden,
            do_classifier_free_guidance=False,
        )
        mask = F.pad(mask, (proj.clip_extra_context_tokens, 0), value=True)

        def net(x_t, t):
            return unet(x_t, t, encoder_hidden_states=ctx, class_labels=add_t, attention_mask=mask).sample

        return diffusion.training_losses(net, b["image"], draws["t"], draws["noise"])

    return [unet, proj], loss


def _super_res_loss(folder: Path, config: Any) -> tuple[list[Any], Callable]:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder)
    factor = config.data.low_res_factor

    def loss(b, draws, diffusion):
        low = F.interpolate(b["low_res"], scale_factor=factor, mode="bicubic", align_corners=False, antialias=True)

        def net(x_t, t):
            return unet(torch.cat([x_t, low], dim=1), t).sample

        return diffusion.training_losses(net, b["image"], draws["t"], draws["noise"])

    return [unet], loss


# diffusers' counterpart of a pipeline component: (trainable modules,
# ``loss(batch, draws, diffusion) -> per-example loss [B]``) with the work of our task's loss.
TORCH_LOSSES: dict[str, Callable[[Path, Any], tuple[list[Any], Callable]]] = {
    "prior": _prior_loss,
    "decoder": _decoder_loss,
    "super_res_first": _super_res_loss,
}


def torch_train_setup(task: str, workdir: Path) -> tuple[Any, list[Any], Callable[[], float]]:
    """(config, parameters, ``step() -> loss``): diffusers forward/backward with our task's loss, AdamW (decay on
    ndim >= 2), global-norm clipping and the EMA update, on the same weights and batch shapes as our train job."""
    import numpy as np

    from unclip_jax.bench.torch_train import TorchDiffusionLoss, adamw, ema_decay, ema_update
    from unclip_jax.train.optim import OPTIMIZER_SCOPE

    torch = torch_module()
    config = workloads.train_config(task, workdir)
    batch = {}
    for k, v in workloads.random_batch(config, workloads.network(config)).items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        batch[k] = t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t  # NHWC -> NCHW
    models, loss_fn = TORCH_LOSSES[stages.task(task).component](workdir / task, config)
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    for m in models:
        m.train()
    o = config.optim
    opt = adamw(params, o)
    ema = [p.detach().clone() for p in params]
    diffusion = TorchDiffusionLoss(config.diffusion)
    b = config.batch_size
    x = batch["image"] if "image" in batch else batch["image_embeds"]
    draws = {"t": torch.randint(0, diffusion.num_timesteps, (b,)), "noise": torch.randn_like(x)}
    t = config.task
    for name, p in (("drop_image_embeds", t.drop_image_prob), ("drop_caption", t.drop_caption_prob)):
        draws[name] = torch.rand(b) < p
    draws["drop_text"] = torch.rand(b) < t.drop_text_prob
    count = {"n": 0}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch, draws, diffusion).mean()
        loss.backward()
        with torch.profiler.record_function(OPTIMIZER_SCOPE):  # the profile's optimizer + EMA category
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
            opt.step()
            ema_update(ema, params, ema_decay(count["n"], float(config.ema.decay), bool(config.ema.warmup)))
        count["n"] += 1
        return float(loss.detach())

    return config, params, step


def job_train(task: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """diffusers forward/backward with our task's loss + AdamW + clipping + EMA on our train job's weights."""
    _, params, step = torch_train_setup(task, workdir)
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    flops = torch_flops(step)
    med, times = median_time(step, repeats)
    return {**timing(med, times, first, flops), "params": int(sum(p.numel() for p in params)), **job_footer()}


def load_unclip_pipeline(folder: Path) -> Any:
    """diffusers ``UnCLIPPipeline`` from a Karlo-layout folder, every part by the class its model_index.json names.

    ``UnCLIPTextProjModel`` lives in diffusers' unCLIP pipeline module (Karlo's index names its library "unclip",
    which ``from_pretrained`` will not import): it is taken from there whatever library the index names.
    """
    from diffusers import UnCLIPPipeline

    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        library, cls_name = entry
        if cls_name == "UnCLIPTextProjModel":
            cls = text_proj_class()
        else:
            cls = getattr(importlib.import_module(library), cls_name)
        parts[name] = cls.from_pretrained(folder / name)
    pipe = UnCLIPPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def job_cascade(workdir: Path, repeats: int) -> dict[str, Any]:
    """diffusers ``UnCLIPPipeline`` from the folder our cascade job wrote (same weights, same sampling settings)."""
    torch = torch_module()
    pipe = load_unclip_pipeline(workdir / "cascade")
    prompts = list(workloads.CASCADE_PROMPTS)
    settings = {}
    for s in stages.STAGES:
        if s.scheduler:  # the stages of diffusers' pipeline; its arguments are named after them
            settings[f"{s.name}_num_inference_steps"] = s.steps
            if s.guided:
                settings[f"{s.name}_guidance_scale"] = s.guidance_scale

    def run(seed):
        with torch.no_grad():
            return pipe(prompts, **settings, generator=torch.Generator().manual_seed(seed), output_type="np").images

    t0 = time.perf_counter()
    images = run(0)
    first = time.perf_counter() - t0
    flops = torch_flops(lambda: run(0))
    med, times = median_time(lambda: run(1), repeats)
    return {**timing(med, times, first, flops), "image_shape": list(images.shape), **job_footer()}
