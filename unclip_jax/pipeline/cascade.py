"""The unCLIP cascade in one place: text -> CLIP -> prior -> decoder -> upsamplers (paper section 2).

Follows diffusers' ``UnCLIPPipeline`` (Karlo) step for step so that the same weights and the same noise give the
same images (``tests/test_pipeline_parity.py``):

1. CLIP text tower on the tokenised captions: ``text_embeds`` z_t and ``last_hidden_state`` (+ caption mask); the
   empty caption ``""`` gives the unconditional inputs of classifier-free guidance.
2. Prior (section 2.2): x0-prediction in the normalised embedding space, classifier-free guidance on a doubled batch
   (unconditional half: CLIP("") or the prior's learned null inputs), strided ancestral sampling as
   ``UnCLIPScheduler`` (or DDIM), then ``denormalize``. The paper draws **2 candidates per caption and keeps the one
   with the larger dot product z_i . z_t**; ``num_candidates`` sets how many (1 = Karlo).
   The **autoregressive prior** (section 2.2, `unclip_jax.models.ar_prior.ARPrior`) can stand in for it: when the
   ``prior`` component is an ``ARPrior`` the stage runs its KV-cached token sampler
   (`unclip_jax.models.ar_prior.sample`: guidance on the logits, temperature / top-k / top-p on the code tokens, the
   dot-product token from the top half of its distribution) inside the same program, then decodes the codes with
   the codec of its ``stats`` collection; the candidate selection is the same for both priors.
3. Decoder (section 2.1): ``UnCLIPTextProj`` + GLIDE U-Net; guidance on the eps channels only (the learned-range
   variance channels come from the conditional half); the unconditional half replaces z_i by the learned CFG
   embedding and the caption by CLIP(""). Output clamped to [-1, 1].
4. Super-resolution (64 -> 256): the low-resolution image is upsampled bicubically with antialiasing
   (``F.interpolate(..., 'bicubic', antialias=True)``, equal to ``jax.image.resize`` to ~1e-6) and concatenated to
   the noisy image; Karlo's two-model schedule runs ``super_res_first`` for all but the last step and
   ``super_res_last`` for the last one. Optional second upsampler (256 -> 1024, paper: DDIM 15 steps).

Everything after tokenisation is ONE ``jax.jit`` program with the sampling loops (``lax.scan``) inside. Static are
only the modules, the respaced diffusions and the sampler settings (a hashable :class:`Plan`); network variables,
token ids, guidance scales and the PRNG key are traced, so a second call with the same shapes and settings does not
recompile (``UnclipPipeline.trace_count`` counts traces; see ``tests/test_pipeline.py``).

Randomness: ``key`` is split into one key per stage (prior, decoder, super_res, upsampler_1024); each stage splits
its key into (init, loop) as `unclip_jax.diffusion.sampling` does: x_T = normal(init), step k's noise =
normal(fold_in(loop, k)). With ``return_intermediates`` the x_T and per-step noises are returned, which is how the
parity test replays them in diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import GaussianDiffusion, classifier_free_guidance, get_named_beta_schedule, respace
from unclip_jax.diffusion import sampling as sampling_lib
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models.ar_prior import ARPrior
from unclip_jax.models.clip import CLIP, CLIPVisionModel, preprocess_images

STAGES = ("prior", "decoder", "super_res", "upsampler_1024")
ImageEmbedSource = Literal["prior", "text", "zero", "learned"]
IMAGE_EMBED_SOURCES = ("prior", "text", "zero", "learned")


# ----------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How one diffusion stage is sampled.

    Attributes:
        steps: number of sampling steps (an int N means diffusers ``UnCLIPScheduler`` spacing, ``"unclipN"``: N steps
            from T-1 down to 0) or any spec of `unclip_jax.diffusion.respace.space_timesteps` (``"ddim27"``, ``"50"``).
        sampler: ``"ddpm"`` (strided ancestral, UnCLIPScheduler) or ``"ddim"`` (Song et al. 2021, with ``eta``).
        eta: DDIM eta (0 deterministic).
        guidance_scale: classifier-free guidance scale s (doubled batch, ``uncond + s (cond - uncond)``); None runs
            the conditional model only. Ignored by the upsamplers (not guided in the paper). With the autoregressive
            prior it is applied to the log-probabilities of every token (`unclip_jax.models.ar_prior.sample`).
        temperature, top_k, top_p: **autoregressive prior only** (ignored by the diffusion stages): the filters of the
            code tokens (`unclip_jax.models.ar_prior.filter_logits`; top_k 0 and top_p 1 are off). The AR prior
            ignores ``steps``, ``sampler`` and ``eta`` (it always draws its k + 1 tokens).
    """

    steps: int | str = 25
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 0.0
    guidance_scale: float | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"StageSettings.sampler={self.sampler!r}: expected 'ddpm' or 'ddim'")
        if self.eta < 0:
            raise ValueError(f"StageSettings.eta={self.eta}: must be >= 0")
        if self.sampler == "ddpm" and self.eta:
            raise ValueError("StageSettings.eta only applies to sampler='ddim'")
        if not self.temperature > 0:
            raise ValueError(f"StageSettings.temperature={self.temperature}: must be > 0")
        if self.top_k < 0:
            raise ValueError(f"StageSettings.top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"StageSettings.top_p={self.top_p}: must be in (0, 1] (1 = off)")

    @property
    def spacing(self) -> str:
        return f"unclip{self.steps}" if isinstance(self.steps, int) else str(self.steps)

    def static(self) -> StageSettings:
        """The part that shapes the compiled program (the guidance scale, eta and temperature values are traced)."""
        return dataclasses.replace(
            self, guidance_scale=None if self.guidance_scale is None else 0.0, eta=0.0, temperature=1.0
        )

    def ar_static(self) -> StageSettings:
        """`static` for the autoregressive prior: only guided-or-not, top_k and top_p shape its program."""
        return StageSettings(
            1, "ddpm", guidance_scale=None if self.guidance_scale is None else 0.0, top_k=self.top_k, top_p=self.top_p
        )

    def describe(self) -> dict[str, Any]:
        """The fields as a dict for reports; the AR-prior-only fields are left out while at their defaults (so the
        description of a diffusion-stage setting is the same as before they existed)."""
        out = dataclasses.asdict(self)
        for name in _AR_FIELDS:
            if out[name] == _AR_DEFAULTS[name]:
                del out[name]
        return out


_AR_FIELDS = ("temperature", "top_k", "top_p")
_AR_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


# Karlo's defaults (diffusers UnCLIPPipeline: prior 25 / guidance 4, decoder 25 / guidance 8, super-res 7) and the
# paper's 256->1024 DDIM 15 steps.
DEFAULT_SETTINGS: dict[str, StageSettings] = {
    "prior": StageSettings(25, "ddpm", guidance_scale=4.0),
    "decoder": StageSettings(25, "ddpm", guidance_scale=8.0),
    "super_res": StageSettings(7, "ddpm"),
    "upsampler_1024": StageSettings(15, "ddim"),
}


def default_diffusion(stage: str) -> GaussianDiffusion:
    """The training diffusion of a stage when a model folder does not say (Karlo's schedulers, paper table 3).

    prior: cosine, x0-prediction, ``fixed_small_log``, clip 5 (normalised space); decoder: cosine, eps,
    ``learned_range``, clip 1; super_res: cosine, eps, ``fixed_small_log``, clip 1; upsampler_1024: linear, eps,
    ``fixed_small_log``, clip 1.
    """
    table = {
        "prior": ("cosine", "x_start", "fixed_small_log", 5.0),
        "decoder": ("cosine", "epsilon", "learned_range", 1.0),
        "super_res": ("cosine", "epsilon", "fixed_small_log", 1.0),
        "upsampler_1024": ("linear", "epsilon", "fixed_small_log", 1.0),
    }
    if stage not in table:
        raise ValueError(f"default_diffusion: unknown stage {stage!r}; expected one of {sorted(table)}")
    schedule, mean, var, clip = table[stage]
    return GaussianDiffusion(
        get_named_beta_schedule(schedule, 1000), model_mean_type=mean, model_var_type=var, clip_denoised=clip
    )


@dataclasses.dataclass
class Component:
    """A linen module and its variables (``{'params': ..., maybe 'stats': ...}``, unboxed arrays)."""

    module: nn.Module
    variables: dict[str, Any]


PRIOR_KINDS = ("diffusion", "ar")


def prior_kind(module: nn.Module) -> str:
    """``"ar"`` for an `unclip_jax.models.ar_prior.ARPrior`, else ``"diffusion"`` (a ``PriorTransformer``)."""
    return "ar" if isinstance(module, ARPrior) else "diffusion"


# ----------------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled cascade program (hashable: modules and diffusions hash by value).

    Attributes:
        mode: ``"generate"`` (captions -> images), ``"decode"`` (given z_i [and x_T] -> images) or ``"invert"``
            (image -> decoder x_T by DDIM inversion).
        text_encoder, prior, decoder, super_res_first, super_res_last, upsampler_1024, image_encoder: modules
            (None when absent / unused: sampling z_i alone, ``stop_after="prior"``, has no decoder). ``prior`` is a
            ``PriorTransformer`` (diffusion prior) or an ``ARPrior`` (autoregressive prior; then ``prior_diffusion``
            is None and ``prior_settings`` is `StageSettings.ar_static`).
        prior_diffusion, decoder_diffusion, super_res_diffusion, upsampler_1024_diffusion: respaced diffusions.
        prior_settings, ...: `StageSettings.static` of each stage.
        num_candidates: prior samples per caption; the one with the largest z_i . z_t is kept (section 2.2).
        image_embed_source: where the decoder's z_i comes from in ``generate`` mode: the prior, the CLIP text
            embedding itself (zero-shot text-embedding decoding, section 5.1), zeros, or the decoder's learned
            CFG embedding (text-only decoding).
        stop_after: last stage to run ("prior", "decoder", "super_res", "upsampler_1024").
        decoder_size, super_res_size, upsampler_1024_size: spatial sizes.
        decoder_clip_denoised: "default" or an override of the decoder diffusion's x0 clipping (manipulations).
        return_intermediates: also return x_T and per-step noises of every stage.
    """

    mode: Literal["generate", "decode", "invert"]
    text_encoder: nn.Module
    decoder: nn.Module | None = None
    decoder_diffusion: GaussianDiffusion | None = None
    decoder_settings: StageSettings | None = None
    prior: nn.Module | None = None
    prior_diffusion: GaussianDiffusion | None = None
    prior_settings: StageSettings | None = None
    super_res_first: nn.Module | None = None
    super_res_last: nn.Module | None = None
    super_res_diffusion: GaussianDiffusion | None = None
    super_res_settings: StageSettings | None = None
    upsampler_1024: nn.Module | None = None
    upsampler_1024_diffusion: GaussianDiffusion | None = None
    upsampler_1024_settings: StageSettings | None = None
    image_encoder: nn.Module | None = None
    num_candidates: int = 2
    image_embed_source: ImageEmbedSource = "prior"
    stop_after: str = "upsampler_1024"
    decoder_size: int = 64
    super_res_size: int = 256
    upsampler_1024_size: int = 1024
    return_intermediates: bool = False

    def runs(self, stage: str) -> bool:
        if stage == "prior" and (self.mode != "generate" or self.image_embed_source != "prior"):
            return False
        if self.mode == "invert" and stage != "decoder":
            return False
        if stage in ("super_res", "upsampler_1024") and getattr(self, f"{stage}_diffusion") is None:
            return False
        return STAGES.index(stage) <= STAGES.index(self.stop_after)


_TRACES: dict[str, int] = {"count": 0}


def trace_count() -> int:
    """How many times a cascade program has been traced (= compiled) in this process."""
    return _TRACES["count"]


# ----------------------------------------------------------------------------------------------------- helpers
def encode_text(module: nn.Module, variables: Mapping[str, Any], input_ids: jax.Array) -> dict[str, jax.Array]:
    """CLIP text tower (a ``CLIPTextModel`` or the two-tower ``CLIP``) -> dict(text_embeds, last_hidden_state).

    Like diffusers' ``_encode_prompt`` the tower gets no padding mask (it is causal and pools at the end token).
    """
    if isinstance(module, CLIP):
        return module.apply(variables, input_ids, method="encode_text")
    return module.apply(variables, input_ids)


def encode_image(module: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """CLIP image tower on images in [-1, 1] ``[B, H, W, 3]`` -> image embeddings ``[B, P]``.

    Images are resized (shorter side, bicubic + antialias), centre-cropped and CLIP-normalised with
    `unclip_jax.models.clip.preprocess_images` first.
    """
    # (a CLIP's vision_model is defined in setup(), so it cannot be read outside apply)
    if not isinstance(module, CLIP | CLIPVisionModel):
        raise TypeError(f"encode_image: expected a CLIPVisionModel or CLIP module, got {type(module).__name__}")
    size = module.vision["image_size"] if isinstance(module, CLIP) else module.image_size
    pixels = preprocess_images((images.astype(jnp.float32) + 1.0) / 2.0, size)
    if isinstance(module, CLIP):
        return module.apply(variables, pixels, method="encode_image")["image_embeds"]
    return module.apply(variables, pixels)["image_embeds"]


def resize(images: jax.Array, size: int) -> jax.Array:
    """Bicubic antialiased resize ``[B, h, w, C] -> [B, size, size, C]`` (diffusers' super-res conditioning:
    ``F.interpolate(..., mode='bicubic', antialias=True)``)."""
    b, _, _, c = images.shape
    return jax.image.resize(images.astype(jnp.float32), (b, size, size, c), "bicubic", antialias=True)


def slerp(a: jax.Array, b: jax.Array, theta: jax.Array) -> jax.Array:
    """Spherical interpolation of the directions of ``a`` and ``b`` (rows, flattened), with the norm interpolated
    linearly: ``|.| = (1-theta)|a| + theta|b|`` (paper section 3; equal to plain slerp for equal norms).

    Args:
        a, b: ``[B, ...]``.
        theta: scalar or ``[B]`` in [0, 1].

    Returns:
        like ``a``; exactly ``a`` at theta 0 and ``b`` at theta 1 (up to rounding).
    """
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1).astype(jnp.float32), b.reshape(shape[0], -1).astype(jnp.float32)
    theta = jnp.broadcast_to(jnp.asarray(theta, jnp.float32), (shape[0],))[:, None]
    na, nb = jnp.linalg.norm(a2, axis=-1, keepdims=True), jnp.linalg.norm(b2, axis=-1, keepdims=True)
    ua, ub = a2 / jnp.maximum(na, 1e-12), b2 / jnp.maximum(nb, 1e-12)
    omega = jnp.arccos(jnp.clip(jnp.sum(ua * ub, -1, keepdims=True), -1.0, 1.0))
    so = jnp.sin(omega)
    small = so < 1e-6
    wa = jnp.where(small, 1.0 - theta, jnp.sin((1.0 - theta) * omega) / jnp.where(small, 1.0, so))
    wb = jnp.where(small, theta, jnp.sin(theta * omega) / jnp.where(small, 1.0, so))
    direction = wa * ua + wb * ub
    direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
    out = direction * ((1.0 - theta) * na + theta * nb)
    return out.reshape(shape).astype(a.dtype)


# Progress lines are printed by a host callback compiled into every program; whether it prints is decided at run
# time (so turning progress on or off never recompiles).
_PROGRESS = {"on": False, "t0": 0.0}


def _callback_progress(stage: str, steps: int, x: jax.Array) -> None:
    def report(_):
        if _PROGRESS["on"]:
            dt = time.perf_counter() - _PROGRESS["t0"]
            print(f"[unclip] {stage}: {steps} steps done ({dt:.1f}s since start)", flush=True)

    jax.debug.callback(report, x.reshape(-1)[0], ordered=True)


def _run_stage(
    diffusion: GaussianDiffusion,
    settings: StageSettings,
    denoise_fn,
    x_T: jax.Array,
    key: jax.Array,
    cond: Mapping[str, Any] | None,
    return_intermediates: bool,
    eta: jax.Array,
):
    if settings.sampler == "ddpm":
        return sampling_lib.p_sample_loop(
            diffusion, denoise_fn, None, key, cond=cond, x_T=x_T, return_intermediates=return_intermediates
        )
    return sampling_lib.ddim_sample_loop(
        diffusion,
        denoise_fn,
        None,
        key,
        cond=cond,
        x_T=x_T,
        eta=eta,
        return_intermediates=return_intermediates,
    )


def _x_T(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    init_key, _ = jax.random.split(key)
    return jax.random.normal(init_key, tuple(shape), jnp.float32)


def _repeat(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), tree)


# ----------------------------------------------------------------------------------------------------- stages
def _prior_stage(plan: Plan, params, text, null, scales, key, out) -> jax.Array:
    """Section 2.2 prior with candidate selection; returns z_i ``[B, D]`` (denormalised)."""
    module, diffusion, settings = plan.prior, plan.prior_diffusion, plan.prior_settings
    variables = params["prior"]
    n = plan.num_candidates
    b = text["text_embeds"].shape[0]
    cond = _repeat(
        dict(
            proj_embedding=text["text_embeds"],
            encoder_hidden_states=text["last_hidden_state"],
            attention_mask=text["mask"],
        ),
        n,
    )
    bn = b * n
    if module.learned_null_text:
        cond["drop_text"] = jnp.zeros((bn,), bool)
        uncond = dict(cond, drop_text=jnp.ones((bn,), bool))
    else:
        uncond = dict(
            proj_embedding=jnp.broadcast_to(null["text_embeds"][:1], cond["proj_embedding"].shape),
            encoder_hidden_states=jnp.broadcast_to(null["last_hidden_state"][:1], cond["encoder_hidden_states"].shape),
            attention_mask=jnp.broadcast_to(null["mask"][:1], cond["attention_mask"].shape),
        )

    def denoise(x, t, **kw):
        return module.apply(variables, x, t, **kw).astype(jnp.float32)

    x_T = _x_T(key, (bn, module.embedding_dim))
    if settings.guidance_scale is None:
        fn, c = denoise, cond
    else:
        fn, c = classifier_free_guidance(denoise, scales["prior"], cond, uncond), None
    res = _run_stage(diffusion, settings, fn, x_T, key, c, plan.return_intermediates, scales["prior_eta"])
    z = res[0] if plan.return_intermediates else res
    if plan.return_intermediates:
        out["prior_latents"], out["prior_noise"] = x_T, res[1]["noise"]
    z = module.apply(variables, z, method="denormalize")
    _callback_progress("prior", diffusion.num_timesteps, z)
    return _keep_best_candidate(z, b, n, text["text_embeds"], out)


def _keep_best_candidate(z: jax.Array, b: int, n: int, text_embeds: jax.Array, out) -> jax.Array:
    """Section 2.2: of the ``n`` candidates per caption (rows ``[b * n, D]``, caption-major) keep the one with the
    largest dot product with the text embedding; records ``candidates``, ``candidate_scores``, ``candidate_index``."""
    candidates = z.reshape(b, n, -1)
    scores = jnp.einsum("bnd,bd->bn", candidates, text_embeds.astype(candidates.dtype))
    index = jnp.argmax(scores, axis=-1)
    out["candidates"], out["candidate_scores"], out["candidate_index"] = candidates, scores, index
    return candidates[jnp.arange(b), index]


def _ar_prior_stage(plan: Plan, params, text, scales, key, out) -> jax.Array:
    """Section 2.2 autoregressive prior with candidate selection; returns z_i ``[B, D]``.

    The captions are repeated ``num_candidates`` times (caption-major, as for the diffusion prior) and sampled in one
    call of `unclip_jax.models.ar_prior.sample` with the stage key (KV-cached scan of the model's sequence;
    unconditional branch = the model's learned null caption; guidance on the log-probabilities; temperature / top-k /
    top-p on the code tokens; the dot-product token from the top half of its distribution). Also records the sampled
    tokens of every candidate: ``prior_codes`` [B, N, k] and ``prior_dot_tokens`` [B, N].
    """
    module, settings = plan.prior, plan.prior_settings
    n = plan.num_candidates
    b = text["text_embeds"].shape[0]
    res = ar_lib.sample(
        module,
        params["prior"],
        _repeat(text["last_hidden_state"], n),
        _repeat(text["mask"], n),
        _repeat(text["text_embeds"], n),
        key,
        guidance_scale=None if settings.guidance_scale is None else scales["prior"],
        temperature=scales["prior_temperature"],
        top_k=settings.top_k,
        top_p=settings.top_p,
    )
    out["prior_codes"] = res["codes"].reshape(b, n, -1)
    out["prior_dot_tokens"] = res["dot_tokens"].reshape(b, n)
    z = res["image_embeds"].astype(jnp.float32)
    _callback_progress("prior", module.num_components + 1, z)
    return _keep_best_candidate(z, b, n, text["text_embeds"], out)


def _decoder_conditions(plan: Plan, text, null, image_embeds, learned_image_embeds: bool):
    b = image_embeds.shape[0]
    cond = dict(
        image_embeds=image_embeds,
        text_embeds=text["text_embeds"],
        text_hidden_states=text["last_hidden_state"],
        text_mask=text["mask"],
        drop_image_embeds=jnp.full((b,), learned_image_embeds, bool),
    )
    uncond = dict(
        image_embeds=image_embeds,
        text_embeds=jnp.broadcast_to(null["text_embeds"][:1], text["text_embeds"].shape),
        text_hidden_states=jnp.broadcast_to(null["last_hidden_state"][:1], text["last_hidden_state"].shape),
        text_mask=jnp.broadcast_to(null["mask"][:1], text["mask"].shape),
        drop_image_embeds=jnp.ones((b,), bool),
    )
    return cond, uncond


def _decoder_fn(plan: Plan, params, cond, uncond, scale):
    module, variables = plan.decoder, params["decoder"]

    def denoise(x, t, **kw):
        return module.apply(variables, x, t, **kw).astype(jnp.float32)

    if plan.decoder_settings.guidance_scale is None:
        return denoise, cond
    # Guidance on the eps channels only; the variance channels come from the conditional half (diffusers).
    return classifier_free_guidance(denoise, scale, cond, uncond, guided_channels=module.in_channels), None


def _decoder_stage(plan: Plan, params, text, null, image_embeds, x_T, scales, key, out, learned) -> jax.Array:
    cond, uncond = _decoder_conditions(plan, text, null, image_embeds, learned)
    fn, c = _decoder_fn(plan, params, cond, uncond, scales["decoder"])
    b = image_embeds.shape[0]
    if x_T is None:
        x_T = _x_T(key, (b, plan.decoder_size, plan.decoder_size, plan.decoder.in_channels))
    res = _run_stage(
        plan.decoder_diffusion, plan.decoder_settings, fn, x_T, key, c, plan.return_intermediates, scales["decoder_eta"]
    )
    x = res[0] if plan.return_intermediates else res
    if plan.return_intermediates:
        out["decoder_latents"], out["decoder_noise"] = x_T, res[1]["noise"]
    x = jnp.clip(x, -1.0, 1.0)
    _callback_progress("decoder", plan.decoder_diffusion.num_timesteps, x)
    return x


def _upsampler_stage(plan: Plan, params, low_res, scales, key, out, stage: str) -> jax.Array:
    if stage == "super_res":
        first, last = plan.super_res_first, plan.super_res_last
        v_first = params["super_res_first"]
        v_last = params.get("super_res_last")
        size, diffusion, settings = plan.super_res_size, plan.super_res_diffusion, plan.super_res_settings
    else:
        first, last, v_first, v_last = plan.upsampler_1024, None, params["upsampler_1024"], None
        size, diffusion, settings = (
            plan.upsampler_1024_size,
            plan.upsampler_1024_diffusion,
            plan.upsampler_1024_settings,
        )
    up = resize(low_res, size)
    last_t = diffusion.timestep_map[0]  # the network timestep of the final sampling step

    def denoise(x, t, low_res):
        run_first = lambda: first.apply(v_first, x, t, low_res).astype(jnp.float32)
        if last is None:
            return run_first()
        run_last = lambda: last.apply(v_last, x, t, low_res).astype(jnp.float32)
        # Karlo: super_res_first for all steps but the last, super_res_last for the last one.
        return jax.lax.cond(t[0] == last_t, run_last, run_first)

    x_T = _x_T(key, (low_res.shape[0], size, size, low_res.shape[-1]))
    eta = scales[f"{stage}_eta"]
    res = _run_stage(diffusion, settings, denoise, x_T, key, dict(low_res=up), plan.return_intermediates, eta)
    x = res[0] if plan.return_intermediates else res
    if plan.return_intermediates:
        out[f"{stage}_latents"], out[f"{stage}_noise"] = x_T, res[1]["noise"]
    x = jnp.clip(x, -1.0, 1.0)
    _callback_progress(stage, diffusion.num_timesteps, x)
    return x


# ----------------------------------------------------------------------------------------------------- program
@functools.partial(jax.jit, static_argnames=("plan",))
def _program(plan: Plan, params: dict[str, Any], inputs: dict[str, Any], scales: dict[str, jax.Array], key):
    """The whole cascade for one :class:`Plan` (traced once per plan and input shapes)."""
    _TRACES["count"] += 1
    out: dict[str, jax.Array] = {}
    k_prior, k_dec, k_sr, k_1024 = jax.random.split(key, 4)
    enc = encode_text(plan.text_encoder, params["text_encoder"], inputs["input_ids"])
    text = dict(text_embeds=enc["text_embeds"], last_hidden_state=enc["last_hidden_state"], mask=inputs["mask"])
    null_enc = encode_text(plan.text_encoder, params["text_encoder"], inputs["null_ids"])
    null = dict(
        text_embeds=null_enc["text_embeds"], last_hidden_state=null_enc["last_hidden_state"], mask=inputs["null_mask"]
    )
    out["text_embeds"] = text["text_embeds"]
    b = text["text_embeds"].shape[0]

    if plan.mode == "invert":
        x_start = inputs["images"]
        cond, uncond = _decoder_conditions(plan, text, null, inputs["image_embeds"], False)
        fn, c = _decoder_fn(plan, params, cond, uncond, scales["decoder"])
        out["x_T"] = sampling_lib.ddim_reverse_loop(plan.decoder_diffusion, fn, x_start, cond=c)
        return out

    learned = False
    if plan.mode == "decode":
        z_i = inputs["image_embeds"]
    elif plan.image_embed_source == "prior" and isinstance(plan.prior, ARPrior):
        z_i = _ar_prior_stage(plan, params, text, scales, k_prior, out)
    elif plan.image_embed_source == "prior":
        z_i = _prior_stage(plan, params, text, null, scales, k_prior, out)
    elif plan.image_embed_source == "text":
        z_i = text["text_embeds"]  # section 5.1: the CLIP text embedding decoded as if it were an image embedding
    else:
        z_i = jnp.zeros((b, plan.decoder.clip_embeddings_dim), jnp.float32)
        learned = plan.image_embed_source == "learned"
    out["image_embeds"] = z_i
    if not plan.runs("decoder"):
        return out
    x = _decoder_stage(plan, params, text, null, z_i, inputs.get("x_T"), scales, k_dec, out, learned)
    out["decoder_images"] = out["images"] = x
    if plan.runs("super_res"):
        x = _upsampler_stage(plan, params, x, scales, k_sr, out, "super_res")
        out["super_res_images"] = out["images"] = x
    if plan.runs("upsampler_1024"):
        x = _upsampler_stage(plan, params, x, scales, k_1024, out, "upsampler_1024")
        out["upsampler_1024_images"] = out["images"] = x
    return out


# ----------------------------------------------------------------------------------------------------- pipeline
class UnclipPipeline:
    """Text-to-image unCLIP cascade (paper section 2) and the building blocks of the manipulations (section 3).

    Args:
        tokenizer: ``texts -> (input_ids [B, L] int32, attention_mask [B, L] bool)``
            (`unclip_jax.input.tokenizer.ClipTokenizer`).
        text_encoder: CLIP text tower (``CLIPTextModel`` or two-tower ``CLIP``).
        decoder: `unclip_jax.models.decoder.UnCLIPDecoder` (None: only z_i can be sampled, ``stop_after="prior"``).
        prior: `unclip_jax.models.prior.PriorTransformer` (diffusion prior) or `unclip_jax.models.ar_prior.ARPrior`
            (autoregressive prior, with its fitted codec in ``variables['stats']``); needed for
            ``image_embed_source='prior'``.
        super_res_first: 64->256 `SuperResUNet` (None: stop at the decoder).
        super_res_last: the model for the last super-resolution step (Karlo); None uses ``super_res_first``.
        upsampler_1024: optional 256->1024 `SuperResUNet`.
        image_encoder: CLIP image tower (``CLIPVisionModel`` or ``CLIP``) for the manipulations.
        diffusions: training diffusion per stage (keys of :data:`STAGES`); missing ones use `default_diffusion`.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Component,
        decoder: Component | None,
        prior: Component | None = None,
        super_res_first: Component | None = None,
        super_res_last: Component | None = None,
        upsampler_1024: Component | None = None,
        image_encoder: Component | None = None,
        diffusions: Mapping[str, GaussianDiffusion] | None = None,
    ):
        self.tokenizer = tokenizer
        self.components: dict[str, Component | None] = dict(
            text_encoder=text_encoder,
            decoder=decoder,
            prior=prior,
            super_res_first=super_res_first,
            super_res_last=super_res_last,
            upsampler_1024=upsampler_1024,
            image_encoder=image_encoder,
        )
        self.diffusions = {s: (diffusions or {}).get(s) or default_diffusion(s) for s in STAGES}
        self._null_tokens = None

    # ------------------------------------------------------------------ accessors
    def component(self, name: str) -> Component:
        """The named component; a missing one is an error naming it."""
        c = self.components.get(name)
        if c is None:
            raise ValueError(f"UnclipPipeline: component {name!r} is not loaded (it is needed for this call)")
        return c

    @property
    def prior_kind(self) -> str | None:
        """``"diffusion"``, ``"ar"`` (autoregressive prior) or None (no prior loaded)."""
        c = self.components.get("prior")
        return None if c is None else prior_kind(c.module)

    @property
    def decoder_size(self) -> int:
        return int(self.component("decoder").module.sample_size)

    @staticmethod
    def trace_count() -> int:
        """Number of cascade traces (compilations) so far in this process."""
        return trace_count()

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self.tokenizer(list(texts))
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def _null(self) -> tuple[np.ndarray, np.ndarray]:
        if self._null_tokens is None:
            self._null_tokens = self.tokenize([""])
        return self._null_tokens

    def _params(self, names: Sequence[str]) -> dict[str, Any]:
        return {n: self.component(n).variables for n in names}

    # ------------------------------------------------------------------ plans
    def _plan(
        self,
        mode: str,
        settings: Mapping[str, StageSettings],
        *,
        num_candidates: int = 2,
        image_embed_source: str = "prior",
        stop_after: str | None = None,
        decoder_clip_denoised: float | None | str = "default",
        return_intermediates: bool = False,
    ) -> tuple[Plan, list[str]]:
        if image_embed_source not in IMAGE_EMBED_SOURCES:
            raise ValueError(f"image_embed_source={image_embed_source!r}: expected one of {IMAGE_EMBED_SOURCES}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates={num_candidates}: must be >= 1")
        c = self.components
        if stop_after is None:
            stop_after = "upsampler_1024" if c["upsampler_1024"] else "super_res" if c["super_res_first"] else "decoder"
        if stop_after not in STAGES:
            raise ValueError(f"stop_after={stop_after!r}: expected one of {STAGES}")
        names = ["text_encoder"]
        kw: dict[str, Any] = dict(
            mode=mode,
            text_encoder=self.component("text_encoder").module,
            num_candidates=num_candidates,
            image_embed_source=image_embed_source,
            stop_after=stop_after,
            return_intermediates=return_intermediates,
        )
        # Sampling z_i alone (stop_after="prior") needs no decoder; the zero / learned sources take its shapes.
        if mode != "generate" or stop_after != "prior" or image_embed_source in ("zero", "learned"):
            dec_diffusion = respace(self.diffusions["decoder"], settings["decoder"].spacing)
            if decoder_clip_denoised != "default":
                dec_diffusion = dataclasses.replace(dec_diffusion, clip_denoised=decoder_clip_denoised)
            names.append("decoder")
            kw.update(
                decoder=self.component("decoder").module,
                decoder_diffusion=dec_diffusion,
                decoder_settings=settings["decoder"].static(),
                decoder_size=self.decoder_size,
            )
        if mode == "generate" and image_embed_source == "prior":
            prior = self.component("prior").module
            names.append("prior")
            if isinstance(prior, ARPrior):
                if settings["prior"].guidance_scale is not None and not prior.learned_null_text:
                    raise ValueError(
                        "prior: this ARPrior has no learned null caption (learned_null_text=False), so it cannot be "
                        "sampled with classifier-free guidance here; set the prior guidance scale to None "
                        "(unclip sample --prior-guidance 0)"
                    )
                kw.update(prior=prior, prior_settings=settings["prior"].ar_static())
            else:
                kw.update(
                    prior=prior,
                    prior_diffusion=respace(self.diffusions["prior"], settings["prior"].spacing),
                    prior_settings=settings["prior"].static(),
                )
        after_decoder = mode != "invert"
        if after_decoder and STAGES.index(stop_after) >= STAGES.index("super_res"):
            first = self.component("super_res_first")
            names.append("super_res_first")
            kw.update(
                super_res_first=first.module,
                super_res_diffusion=respace(self.diffusions["super_res"], settings["super_res"].spacing),
                super_res_settings=dataclasses.replace(settings["super_res"].static(), guidance_scale=None),
                super_res_size=int(first.module.sample_size),
            )
            if c["super_res_last"] is not None:
                names.append("super_res_last")
                kw["super_res_last"] = c["super_res_last"].module
        if after_decoder and stop_after == "upsampler_1024":
            up = self.component("upsampler_1024")
            names.append("upsampler_1024")
            kw.update(
                upsampler_1024=up.module,
                upsampler_1024_diffusion=respace(self.diffusions["upsampler_1024"], settings["upsampler_1024"].spacing),
                upsampler_1024_settings=dataclasses.replace(settings["upsampler_1024"].static(), guidance_scale=None),
                upsampler_1024_size=int(up.module.sample_size),
            )
        return Plan(**kw), names

    @staticmethod
    def _settings(overrides: Mapping[str, StageSettings | None] | None) -> dict[str, StageSettings]:
        s = dict(DEFAULT_SETTINGS)
        for k, v in (overrides or {}).items():
            if k not in STAGES:
                raise ValueError(f"settings: unknown stage {k!r}; expected one of {STAGES}")
            if v is not None:
                s[k] = v
        return s

    @staticmethod
    def _scales(settings: Mapping[str, StageSettings]) -> dict[str, jax.Array]:
        """The traced per-stage numbers: guidance scales (prior, decoder), DDIM etas (``<stage>_eta``) and the AR
        prior's temperature (``prior_temperature``)."""
        out = {}
        for k, s in settings.items():
            out[f"{k}_eta"] = jnp.asarray(s.eta, jnp.float32)
            if k in ("prior", "decoder"):
                out[k] = jnp.asarray(1.0 if s.guidance_scale is None else s.guidance_scale, jnp.float32)
        out["prior_temperature"] = jnp.asarray(settings["prior"].temperature, jnp.float32)
        return out

    def _inputs(self, texts: Sequence[str]) -> dict[str, Any]:
        ids, mask = self.tokenize(texts)
        null_ids, null_mask = self._null()
        return dict(input_ids=ids, mask=mask, null_ids=null_ids, null_mask=null_mask)

    @staticmethod
    def _key(seed: int | jax.Array) -> jax.Array:
        return jax.random.PRNGKey(seed) if isinstance(seed, int | np.integer) else seed

    def _execute(self, plan: Plan, names: Sequence[str], inputs, settings, seed, progress=False) -> dict[str, Any]:
        _PROGRESS.update(on=progress, t0=time.perf_counter())
        try:
            out = _program(plan, self._params(names), inputs, self._scales(settings), self._key(seed))
            out = jax.block_until_ready(out)
            jax.effects_barrier()
        finally:
            _PROGRESS["on"] = False
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        seed: int | jax.Array = 0,
        num_images_per_prompt: int = 1,
        settings: Mapping[str, StageSettings | None] | None = None,
        num_candidates: int = 2,
        image_embed_source: ImageEmbedSource = "prior",
        stop_after: str | None = None,
        return_intermediates: bool = False,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Text-to-image sampling.

        Args:
            prompts: one caption or a list (a batch).
            seed: int seed or a PRNG key.
            num_images_per_prompt: each caption is repeated (``repeat_interleave``) this many times.
            settings: per-stage `StageSettings` overriding :data:`DEFAULT_SETTINGS` (keys of :data:`STAGES`).
            num_candidates: prior samples per image; the largest z_i . z_t is kept (paper: 2; Karlo: 1). Applies
                to the diffusion and the autoregressive prior alike.
            image_embed_source: "prior", "text" (decode z_t zero-shot, section 5.1), "zero" or "learned"
                (text-only decoding with a zero / the learned CFG image embedding).
            stop_after: last stage (default: the last loaded upsampler).
            return_intermediates: include x_T and per-step noise of every stage.
            progress: print a line as each stage finishes.

        Returns:
            numpy dict: ``images`` [B, H, W, 3] in [-1, 1] (the last stage's output), ``decoder_images``,
            ``super_res_images`` / ``upsampler_1024_images`` when run, ``image_embeds`` [B, D], ``text_embeds``,
            and with the prior ``candidates`` [B, N, D], ``candidate_scores`` [B, N], ``candidate_index`` [B]
            (with the autoregressive prior also ``prior_codes`` [B, N, k] and ``prior_dot_tokens`` [B, N]).
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [t for t in texts for _ in range(num_images_per_prompt)]
        s = self._settings(settings)
        plan, names = self._plan(
            "generate",
            s,
            num_candidates=num_candidates,
            image_embed_source=image_embed_source,
            stop_after=stop_after,
            return_intermediates=return_intermediates,
        )
        return self._execute(plan, names, self._inputs(texts), s, seed, progress)

    def decode(
        self,
        image_embeds: np.ndarray | jax.Array,
        *,
        captions: Sequence[str] | None = None,
        x_T: np.ndarray | jax.Array | None = None,
        seed: int | jax.Array = 0,
        settings: Mapping[str, StageSettings | None] | None = None,
        stop_after: str | None = None,
        decoder_clip_denoised: float | None | str = "default",
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Decodes given CLIP image embeddings (and optionally a fixed decoder x_T) through decoder and upsamplers.

        Args:
            image_embeds: ``[B, D]`` z_i.
            captions: caption per row (default ``""``: image-only conditioning, as diffusers' image variation).
            x_T: optional ``[B, s, s, 3]`` decoder latent (e.g. from `invert`).
            decoder_clip_denoised: override of the decoder's x0 clipping ("default" keeps it; None disables, which
                makes DDIM eta=0 the exact inverse of `invert`).
            Others as `__call__`.

        Returns:
            numpy dict as `__call__` (no prior outputs).
        """
        z = jnp.asarray(image_embeds, jnp.float32)
        texts = list(captions) if captions is not None else [""] * z.shape[0]
        s = self._settings(settings)
        plan, names = self._plan("decode", s, stop_after=stop_after, decoder_clip_denoised=decoder_clip_denoised)
        inputs = dict(self._inputs(texts), image_embeds=z)
        if x_T is not None:
            inputs["x_T"] = jnp.asarray(x_T, jnp.float32)
        return self._execute(plan, names, inputs, s, seed, progress)

    def invert(
        self,
        images: np.ndarray | jax.Array,
        image_embeds: np.ndarray | jax.Array,
        *,
        captions: Sequence[str] | None = None,
        settings: Mapping[str, StageSettings | None] | None = None,
    ) -> np.ndarray:
        """DDIM inversion of images with the decoder conditioned on z_i (paper section 3: the bipartite latent).

        Uses the decoder stage's steps and guidance (the same guided network as `decode`, so that decoding the
        result with DDIM eta=0 reconstructs the image).

        Args:
            images: ``[B, s, s, 3]`` in [-1, 1] at the decoder's resolution.
            image_embeds: ``[B, D]`` their CLIP image embeddings.
            captions: as `decode`.

        Returns:
            x_T ``[B, s, s, 3]``.
        """
        images = jnp.asarray(images, jnp.float32)
        texts = list(captions) if captions is not None else [""] * images.shape[0]
        s = self._settings(settings)
        s["decoder"] = dataclasses.replace(s["decoder"], sampler="ddim", eta=0.0)  # only steps and guidance matter
        plan, names = self._plan("invert", s, stop_after="decoder", decoder_clip_denoised=None)
        inputs = dict(self._inputs(texts), images=images, image_embeds=jnp.asarray(image_embeds, jnp.float32))
        return self._execute(plan, names, inputs, s, 0)["x_T"]

    def encode_images(self, images: np.ndarray | jax.Array) -> np.ndarray:
        """CLIP image embeddings ``[B, P]`` of images ``[B, H, W, 3]`` in [-1, 1] (needs ``image_encoder``)."""
        c = self.component("image_encoder")
        return np.asarray(_encode_images_jit(c.module, c.variables, jnp.asarray(images, jnp.float32)))

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """CLIP ``text_embeds`` [B, P] and ``last_hidden_state`` [B, L, W] and the caption ``mask``."""
        c = self.component("text_encoder")
        ids, mask = self.tokenize(texts)
        out = _encode_text_jit(c.module, c.variables, jnp.asarray(ids))
        return dict(
            text_embeds=np.asarray(out["text_embeds"]),
            last_hidden_state=np.asarray(out["last_hidden_state"]),
            mask=mask,
        )


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_images_jit(module, variables, images):
    return encode_image(module, variables, images)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_text_jit(module, variables, ids):
    return encode_text(module, variables, ids)
