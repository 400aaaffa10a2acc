"""Parity of UnclipPipeline with diffusers' UnCLIPPipeline (Karlo) on a small random cascade.

A random cascade of the models' ``test`` variants (prior, text_proj + decoder, two different super-res U-Nets, CLIP
text tower, the real CLIP BPE tokenizer) is written in the diffusers Karlo layout, imported back into ours through
`load_pipeline`, and run by both with the same initial latents and the same per-step noise (diffusers'
``UnCLIPScheduler`` draws its noise through ``randn_tensor``, which is replaced by our noise in call order), with
prior guidance 4, decoder guidance 8 and the strided ancestral sampler (UnCLIPScheduler spacing).

diffusers' schedulers keep betas / alphas_cumprod in float32, where ``1 - alphas_cumprod[0]`` and the recomputed
``alpha = 1 - beta`` of the first strided step lose most of their digits (its last step scales x_0 by 0.99947
instead of 1; see tests/diffusion/test_sampling.py). Ours keeps the tables in float64, so the comparison sets the
same schedule in float64 in diffusers' schedulers; the stock float32 difference is printed for information.
"""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.diffusion import get_named_beta_schedule
from unclip_jax.pipeline import StageSettings, testing
from unclip_jax.pipeline.loading import load_pipeline

PROMPTS = ["a red cube on a blue ball", "two dogs"]
STEPS = dict(prior=4, decoder=5, super_res=3)


def _float64_tables(torch, sched):
    betas = get_named_beta_schedule("cosine", sched.config.num_train_timesteps)
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-6)  # the same schedule, more digits
    sched.betas = torch.from_numpy(betas.copy())
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)


@pytest.mark.torch
def test_images_match_diffusers(tmp_path, torch_threads, monkeypatch):
    torch = torch_threads
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from diffusers.schedulers import scheduling_unclip
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = testing.save_diffusers_pipeline(testing.random_pipeline("test", seed=1), tmp_path / "karlo")
    ours = load_pipeline(folder, require=("text_encoder", "prior", "decoder", "super_res_first", "super_res_last"))
    settings = dict(
        prior=StageSettings(STEPS["prior"], "ddpm", guidance_scale=4.0),
        decoder=StageSettings(STEPS["decoder"], "ddpm", guidance_scale=8.0),
        super_res=StageSettings(STEPS["super_res"], "ddpm"),
    )
    out = ours(PROMPTS, seed=3, settings=settings, num_candidates=1, return_intermediates=True)

    pipe = UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(folder / "prior"),
        decoder=UNet2DConditionModel.from_pretrained(folder / "decoder"),
        text_proj=UnCLIPTextProjModel.from_pretrained(folder / "text_proj"),
        super_res_first=UNet2DModel.from_pretrained(folder / "super_res_first"),
        super_res_last=UNet2DModel.from_pretrained(folder / "super_res_last"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        prior_scheduler=UnCLIPScheduler.from_pretrained(folder / "prior_scheduler"),
        decoder_scheduler=UnCLIPScheduler.from_pretrained(folder / "decoder_scheduler"),
        super_res_scheduler=UnCLIPScheduler.from_pretrained(folder / "super_res_scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    # The learned super_res_last must differ from super_res_first, or the two-model schedule is not tested.
    assert not np.allclose(
        ours.components["super_res_first"].variables["params"]["conv_out"]["kernel"],
        ours.components["super_res_last"].variables["params"]["conv_out"]["kernel"],
    )

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.array(x), -1, 1)))

    # Step noise in diffusers' call order: every step but the last (t = 0) of each stage.
    queue = []

    def replay(shape, **_):
        noise = queue.pop(0)
        assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
        return noise

    def run_diffusers():
        queue[:] = [torch.from_numpy(np.array(n)) for n in out["prior_noise"][:-1]]
        queue.extend(nchw(n) for n in out["decoder_noise"][:-1])
        queue.extend(nchw(n) for n in out["super_res_noise"][:-1])
        with torch.no_grad():
            images = pipe(
                PROMPTS,
                prior_num_inference_steps=STEPS["prior"],
                decoder_num_inference_steps=STEPS["decoder"],
                super_res_num_inference_steps=STEPS["super_res"],
                prior_latents=torch.from_numpy(np.array(out["prior_latents"])),
                decoder_latents=nchw(out["decoder_latents"]),
                super_res_latents=nchw(out["super_res_latents"]),
                prior_guidance_scale=4.0,
                decoder_guidance_scale=8.0,
                output_type="np",
            ).images
        assert not queue, f"{len(queue)} noise tensors unused"
        return images

    monkeypatch.setattr(scheduling_unclip, "randn_tensor", replay)
    got = np.clip(out["images"] * 0.5 + 0.5, 0.0, 1.0)
    stock = run_diffusers()
    for sched in (pipe.prior_scheduler, pipe.decoder_scheduler, pipe.super_res_scheduler):
        _float64_tables(torch, sched)
    ref = run_diffusers()
    assert got.shape == ref.shape == (2, 32, 32, 3)
    assert ref.std() > 0.05  # a non-trivial image
    err = float(np.abs(got - ref).max())
    print(
        f"max |ours - diffusers| = {err:.2e} (images in [0, 1]; stock float32 diffusers tables: "
        f"{float(np.abs(got - stock).max()):.2e})"
    )
    assert err < 1e-4
