"""The static part of one compiled cascade program: :class:`Plan` and :func:`make_plan`.

Static are only the networks, the respaced diffusions, the static sampler settings and the program's shape
(mode, stop stage, candidates, sizes, progress); everything else (network variables, token ids, guidance scales, etas,
the PRNG key) is traced, so calls that differ only in those share one compilation. A plan is hashable: networks,
diffusions and settings hash by value, the progress callback by identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import flax.linen as nn

from unclip_jax import stages
from unclip_jax.diffusion import GaussianDiffusion, respace
from unclip_jax.pipeline.priors import PriorSampler, prior_sampler
from unclip_jax.pipeline.settings import STAGES, StageSettings

ImageEmbedSource = Literal["prior", "text", "zero", "learned"]
IMAGE_EMBED_SOURCES: tuple[str, ...] = get_args(ImageEmbedSource)
ProgressFn = Callable[[str, int], None]  # (stage, steps) as each stage finishes


InpaintMethod = Literal["repaint", "model"]
INPAINT_METHODS: tuple[str, ...] = get_args(InpaintMethod)


@dataclasses.dataclass(frozen=True)
class InpaintSettings:
    """How a plan inpaints (the program then reads ``inpaint_image`` / ``inpaint_mask`` inputs).

    Attributes:
        method: ``"repaint"``: RePaint resampling with any decoder (`unclip_jax.diffusion.repaint`, Lugmayr et al.
            2022); ``"model"``: GLIDE's inpainting decoder (4 extra input channels: masked image and mask), sampled
            as usual with the known pixels pasted at the end. The upsamplers always use RePaint, so every stage keeps
            the unmasked pixels.
        jump_length, jump_n_sample: RePaint's resampling schedule (`unclip_jax.diffusion.repaint.jump_schedule`).
    """

    method: InpaintMethod = "repaint"
    jump_length: int = 10
    jump_n_sample: int = 10

    def __post_init__(self) -> None:
        if self.method not in INPAINT_METHODS:
            raise ValueError(f"inpaint method {self.method!r}: expected one of {INPAINT_METHODS}")
        if self.jump_length < 1 or self.jump_n_sample < 1:
            raise ValueError(
                f"inpaint jump_length={self.jump_length}, jump_n_sample={self.jump_n_sample}: both must be >= 1"
            )


@dataclasses.dataclass(frozen=True)
class DiffusionStage:
    """A diffusion-sampled stage of a plan (decoder, super_res, upsampler_1024).

    Attributes:
        module: the network.
        diffusion: the respaced sampling diffusion.
        settings: `StageSettings.static` of the stage (guidance None for the unguided upsamplers).
        size: output side in pixels.
        last_module: super-resolution only: the network of the final step (Karlo's ``super_res_last``), or None.
    """

    module: nn.Module
    diffusion: GaussianDiffusion
    settings: StageSettings
    size: int
    last_module: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled cascade program.

    Attributes:
        mode: ``"generate"`` (captions -> images), ``"decode"`` (given z_i [and x_T] -> images) or ``"invert"``
            (image -> decoder x_T by DDIM inversion).
        text_encoder: CLIP text tower.
        prior: the prior's `unclip_jax.pipeline.priors.PriorSampler` (None unless it runs).
        decoder, super_res, upsampler_1024: the diffusion stages (None when not run or, for the decoder, absent:
            sampling z_i alone with ``stop_after="prior"`` needs no decoder).
        num_candidates: prior samples per caption; the one with the largest z_i . z_t is kept (section 2.2).
        image_embed_source: where the decoder's z_i comes from in ``generate`` mode: the prior, the CLIP text
            embedding itself (zero-shot text-embedding decoding, section 5.1), zeros, or the decoder's learned
            CFG embedding (text-only decoding).
        stop_after: last stage to run (one of :data:`unclip_jax.pipeline.settings.STAGES`).
        return_intermediates: also return x_T and per-step noises of every stage.
        progress: called on the host with (stage, steps) as each stage finishes (compiled in as an ordered
            ``jax.debug.callback``; None: no callbacks, as a program sharded over several devices needs).
        inpaint: inpainting settings (``generate`` / ``decode`` modes), or None.
    """

    mode: Literal["generate", "decode", "invert"]
    text_encoder: nn.Module
    prior: PriorSampler | None = None
    decoder: DiffusionStage | None = None
    super_res: DiffusionStage | None = None
    upsampler_1024: DiffusionStage | None = None
    num_candidates: int = 2
    image_embed_source: ImageEmbedSource = "prior"
    stop_after: str = "upsampler_1024"
    return_intermediates: bool = False
    progress: ProgressFn | None = None
    inpaint: InpaintSettings | None = None

    def runs(self, stage: str) -> bool:
        """Whether the program runs ``stage``."""
        if stage == "prior":
            return self.prior is not None
        if self.mode == "invert" and stage != "decoder":
            return False
        if getattr(self, stage) is None:
            return False
        return STAGES.index(stage) <= STAGES.index(self.stop_after)


def _diffusion_stage(
    stage: str, module: nn.Module, diffusions: Mapping[str, GaussianDiffusion], settings: StageSettings, **kw: Any
) -> DiffusionStage:
    static = settings.static()
    if not stages.stage(stage).guided:
        static = dataclasses.replace(static, guidance_scale=None)
    return DiffusionStage(module, respace(diffusions[stage], settings.spacing), static, int(module.sample_size), **kw)


def make_plan(
    modules: Mapping[str, nn.Module | None],
    diffusions: Mapping[str, GaussianDiffusion],
    mode: Literal["generate", "decode", "invert"],
    settings: Mapping[str, StageSettings],
    *,
    num_candidates: int = 2,
    image_embed_source: str = "prior",
    stop_after: str | None = None,
    decoder_clip_denoised: float | None | str = "default",
    return_intermediates: bool = False,
    progress: ProgressFn | None = None,
    inpaint: InpaintSettings | None = None,
) -> tuple[Plan, list[str]]:
    """The plan of one call, and the components whose variables it reads.

    Args:
        modules: the pipeline's networks by component name (None: not loaded).
        diffusions: the training diffusion per stage.
        mode, num_candidates, image_embed_source, stop_after, return_intermediates, progress, inpaint: see :class:`Plan`
            (``stop_after`` None: the last loaded upsampler).
        settings: every stage's full `StageSettings` (`unclip_jax.pipeline.settings.resolve_settings`).
        decoder_clip_denoised: "default" or an override of the decoder diffusion's x0 clipping (manipulations).

    Raises:
        ValueError: a bad argument, or a component the plan needs is not loaded (naming it).
    """
    if image_embed_source not in IMAGE_EMBED_SOURCES:
        raise ValueError(f"image_embed_source={image_embed_source!r}: expected one of {IMAGE_EMBED_SOURCES}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates}: must be >= 1")
    if stop_after is None:
        last = [
            s
            for s, c in (("upsampler_1024", "upsampler_1024"), ("super_res", "super_res_first"))
            if modules.get(c) is not None
        ]
        stop_after = last[0] if last else "decoder"
    if stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: expected one of {STAGES}")
    if inpaint is not None and (mode == "invert" or return_intermediates):
        raise ValueError("inpainting runs in the generate / decode modes, without return_intermediates")

    def need(name: str) -> nn.Module:
        if modules.get(name) is None:
            raise ValueError(f"UnclipPipeline: component {name!r} is not loaded (it is needed for this call)")
        names.append(name)
        return modules[name]

    names: list[str] = []
    kw: dict[str, Any] = dict(
        mode=mode,
        text_encoder=need("text_encoder"),
        num_candidates=num_candidates,
        image_embed_source=image_embed_source,
        stop_after=stop_after,
        return_intermediates=return_intermediates,
        progress=progress,
        inpaint=inpaint,
    )
    # Sampling z_i alone (stop_after="prior") needs no decoder; the zero / learned sources take its shapes.
    if mode != "generate" or stop_after != "prior" or image_embed_source in ("zero", "learned"):
        decoder = _diffusion_stage("decoder", need("decoder"), diffusions, settings["decoder"])
        if decoder_clip_denoised != "default":
            decoder = dataclasses.replace(
                decoder, diffusion=dataclasses.replace(decoder.diffusion, clip_denoised=decoder_clip_denoised)
            )
        kw["decoder"] = decoder
        inpaints = decoder.module.in_channels != getattr(decoder.module, "image_channels", decoder.module.in_channels)
        if inpaint is not None and inpaint.method == "model" and not inpaints:
            raise ValueError(
                "inpaint method 'model' needs GLIDE's inpainting decoder (in_channels 7: experiments/decoder_inpaint.py);"
                " this decoder has 3 input channels: use method 'repaint'"
            )
        if inpaints and inpaint is None:
            raise ValueError("this decoder is an inpainting decoder (in_channels 7): it samples through inpaint()")
    if mode == "generate" and image_embed_source == "prior":
        kw["prior"] = prior_sampler(need("prior"), diffusions["prior"], settings["prior"])
    if mode != "invert" and STAGES.index(stop_after) >= STAGES.index("super_res"):
        first = need("super_res_first")
        last = need("super_res_last") if modules.get("super_res_last") is not None else None
        kw["super_res"] = _diffusion_stage("super_res", first, diffusions, settings["super_res"], last_module=last)
    if mode != "invert" and stop_after == "upsampler_1024":
        up = need("upsampler_1024")
        kw["upsampler_1024"] = _diffusion_stage("upsampler_1024", up, diffusions, settings["upsampler_1024"])
    return Plan(**kw), names
