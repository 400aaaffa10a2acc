"""The PyTorch side of the bench: diffusers' networks and ``UnCLIPPipeline`` on the weights our jobs wrote.

A train step is the network's forward/backward on the same batch shapes as ours, an MSE loss on the predicted
noise / x0 and ``torch.optim.AdamW`` with our experiment's optimiser settings and clipping (the decoder's
variational-bound term is elementwise and adds no measurable work). The cascade is diffusers' ``UnCLIPPipeline``
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
    import torch.nn.functional as F
    from diffusers import PriorTransformer

    model = PriorTransformer.from_pretrained(folder)

    def loss(b, t, noise):
        x_t = b["image_embeds"] + noise  # the network's cost does not depend on the noise level
        out = model(
            x_t,
            timestep=t,
            proj_embedding=b["text_embeds"],
            encoder_hidden_states=b["text_hidden_states"],
            attention_mask=b["text_mask"],
        ).predicted_image_embedding
        return F.mse_loss(out, b["image_embeds"])

    return [model], loss


def _decoder_loss(folder: Path, config: Any) -> tuple[list[Any], Callable]:
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "decoder")
    proj = text_proj_class().from_pretrained(folder / "text_proj")

    def loss(b, t, noise):
        hidden, add_t = proj(
            image_embeddings=b["image_embeds"],
            prompt_embeds=b["text_embeds"],
            text_encoder_hidden_states=b["text_hidden_states"],
            do_classifier_free_guidance=False,
        )
        mask = F.pad(b["text_mask"], (proj.clip_extra_context_tokens, 0), value=True)
        out = unet(b["image"] + noise, t, encoder_hidden_states=hidden, class_labels=add_t, attention_mask=mask).sample
        return F.mse_loss(out[:, :3], noise)

    return [unet, proj], loss


def _super_res_loss(folder: Path, config: Any) -> tuple[list[Any], Callable]:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder)
    factor = config.data.low_res_factor

    def loss(b, t, noise):
        low = F.interpolate(b["low_res"], scale_factor=factor, mode="bicubic", align_corners=False)
        out = unet(torch.cat([b["image"] + noise, low], dim=1), t).sample
        return F.mse_loss(out[:, :3], noise)

    return [unet], loss


# diffusers' counterpart of a pipeline component: (trainable modules, ``loss(batch, t, noise) -> scalar``).
TORCH_LOSSES: dict[str, Callable[[Path, Any], tuple[list[Any], Callable]]] = {
    "prior": _prior_loss,
    "decoder": _decoder_loss,
    "super_res_first": _super_res_loss,
}


def job_train(task: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """diffusers forward/backward + AdamW on the same weights and batch shapes as our train job."""
    import numpy as np

    torch = torch_module()
    config = workloads.train_config(task, workdir)
    batch = {}
    for k, v in workloads.random_batch(config, workloads.network(config)).items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        batch[k] = t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t  # NHWC -> NCHW
    models, loss_fn = TORCH_LOSSES[stages.task(task).component](workdir / task, config)
    params = [p for m in models for p in m.parameters()]
    for m in models:
        m.train()
    o = config.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    noise = torch.randn_like(batch["image"] if "image" in batch else batch["image_embeds"])
    t = torch.randint(0, config.diffusion.steps, (config.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
        opt.step()
        return float(loss)

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
