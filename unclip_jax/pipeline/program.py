"""The cascade as one compiled program: text -> CLIP -> prior -> decoder -> upsamplers (paper section 2).

Follows diffusers' ``UnCLIPPipeline`` (Karlo) step for step so that the same weights and the same noise give the
same images (``tests/pipeline/test_parity.py``):

1. CLIP text tower on the tokenised captions: ``text_embeds`` z_t and ``last_hidden_state`` (+ caption mask); the
   empty caption ``""`` gives the unconditional inputs of classifier-free guidance.
2. Prior (section 2.2): ``num_candidates`` draws of z_i per caption from the plan's
   `unclip_jax.pipeline.priors.PriorSampler` (diffusion or autoregressive), the one with the largest z_i . z_t kept.
3. Decoder (section 2.1): ``UnCLIPTextProj`` + GLIDE U-Net; guidance on the eps channels only (the learned-range
   variance channels come from the conditional half); the unconditional half replaces z_i by the learned CFG
   embedding and the caption by CLIP("") (with GLIDE's caption transformer: GLIDE's empty caption tokens).
   Output clamped to [-1, 1].
4. Super-resolution (64 -> 256): the low-resolution image is upsampled bicubically with antialiasing
   (`unclip_jax.pipeline.ops.resize`) and concatenated to the noisy image; Karlo's two-model schedule runs
   ``super_res_first`` for all but the last step and ``super_res_last`` for the last one. Optional second upsampler
   (256 -> 1024, paper: DDIM 15 steps).

Inpainting (``Plan.inpaint``): the decoder and upsampler stages sample with RePaint resampling
(`unclip_jax.diffusion.repaint`) around the source image and mask given as inputs, resized to each stage's size, or the
decoder is GLIDE's inpainting decoder (the masked image and mask as inputs of both guidance branches); the known pixels
are the source's at every stage.

Everything after tokenisation is ONE ``jax.jit`` program with the sampling loops (``lax.scan``) inside, static only
in its :class:`~unclip_jax.pipeline.plan.Plan`; :data:`CASCADE` counts its traces (= compilations).
:class:`Program` binds a plan to its variables and traced settings, optionally batch-sharded over a device mesh.

Randomness: ``key`` is split into one key per stage (prior, decoder, super_res, upsampler_1024); each stage splits
its key into (init, loop) as `unclip_jax.diffusion.sampling` does: x_T = normal(init), step k's noise =
normal(fold_in(loop, k)). With ``return_intermediates`` the x_T and per-step noises are returned, which is how the
parity test replays them in diffusers. The noise does not depend on how the batch is sharded (JAX's partitionable
threefry), so a sharded program draws the samples of the unsharded one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import classifier_free_guidance, ddim_reverse_loop
from unclip_jax.diffusion.repaint import binarize_mask, repaint_loop
from unclip_jax.models.glide_text import empty_caption
from unclip_jax.pipeline.loops import initial_noise, sample_loop
from unclip_jax.pipeline.ops import encode_text, resize
from unclip_jax.pipeline.plan import DiffusionStage, Plan
from unclip_jax.pipeline.priors import keep_best_candidate

Arrays = Mapping[str, jax.Array]
# Inputs with one row per sample (split over a mesh's batch axis); the others (null caption) are replicated.
ROW_INPUTS = ("input_ids", "mask", "image_embeds", "images", "x_T", "inpaint_image", "inpaint_mask")


def print_progress(stage: str, steps: int) -> None:
    """The default progress callback: ``[unclip] <stage>: <steps> steps done at <time of day>``."""
    print(f"[unclip] {stage}: {steps} steps done at {time.strftime('%H:%M:%S')}", flush=True)


def _stage_done(plan: Plan, stage: str, steps: int, x: jax.Array) -> None:
    """Compiles the plan's progress callback in after a stage (ordered after the stage's result ``x``)."""
    if plan.progress is not None:
        progress = plan.progress
        jax.debug.callback(lambda _: progress(stage, steps), x.reshape(-1)[0], ordered=True)


# ----------------------------------------------------------------------------------------------------- stages
def decoder_conditions(
    module: Any, text: Arrays, null: Arrays, image_embeds: jax.Array, learned_image_embeds: bool
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The decoder's conditional and unconditional keyword arguments (classifier-free guidance, section 2.1).

    The unconditional branch replaces z_i by the learned CFG embedding and the caption by the empty caption: CLIP's
    encoding of ``""`` (``null``) for a CLIP-caption decoder, GLIDE's empty caption tokens
    (`unclip_jax.models.glide_text.empty_caption`, as in training) for a decoder with GLIDE's text transformer.
    """
    b = image_embeds.shape[0]
    if getattr(module, "glide", False):
        null_ids, null_mask = empty_caption(*text["input_ids"].shape)
        cond = dict(
            image_embeds=image_embeds,
            input_ids=text["input_ids"],
            text_mask=text["mask"],
            drop_image_embeds=jnp.full((b,), learned_image_embeds, bool),
        )
        uncond = dict(
            image_embeds=image_embeds, input_ids=null_ids, text_mask=null_mask, drop_image_embeds=jnp.ones((b,), bool)
        )
        return cond, uncond
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


def _decoder_fn(stage: DiffusionStage, variables, cond, uncond, scale):
    module = stage.module

    def denoise(x, t, **kw):
        return module.apply(variables, x, t, **kw).astype(jnp.float32)

    if stage.settings.guidance_scale is None:
        return denoise, cond
    # Guidance on the eps channels only; the variance channels come from the conditional half (diffusers).
    return classifier_free_guidance(denoise, scale, cond, uncond, guided_channels=module.image_channels), None


def stage_inpaint_inputs(inputs: Mapping[str, Any], size: int) -> tuple[jax.Array, jax.Array]:
    """The source image and the binary mask (1 = known) of an inpainting program at a stage's ``size``.

    ``inputs["inpaint_image"]`` [B, H, W, 3] in [-1, 1] is resized like the upsamplers' conditioning (bicubic,
    antialiased; `unclip_jax.pipeline.ops.resize`) and clipped to [-1, 1]; ``inputs["inpaint_mask"]`` [B, H, W, 1]
    is averaged (linear, antialiased) and thresholded at `unclip_jax.diffusion.repaint.MASK_THRESHOLD`. At the
    inputs' own size both are used as given (so the last stage keeps exactly the source's known pixels).
    """
    image, mask = inputs["inpaint_image"].astype(jnp.float32), inputs["inpaint_mask"].astype(jnp.float32)
    if image.shape[1] != size or image.shape[2] != size:
        image = resize(image, size)
        b = mask.shape[0]
        mask = jax.image.resize(mask, (b, size, size, mask.shape[-1]), "linear", antialias=True)
    return jnp.clip(image, -1.0, 1.0), binarize_mask(mask)


def _stage_loop(plan: Plan, stage: DiffusionStage, fn, x_T, key, cond, eta, known) -> Any:
    """The stage's sampling loop: the plain sampler, or RePaint when the plan inpaints with it (``known`` = (source,
    mask) at the stage's size); GLIDE's inpainting decoder samples plainly (its inputs are in ``cond``)."""
    if known is None or (stage is plan.decoder and plan.inpaint.method == "model"):
        return sample_loop(stage.diffusion, stage.settings, fn, x_T, key, cond, plan.return_intermediates, eta)
    ip = plan.inpaint
    return repaint_loop(
        stage.diffusion,
        fn,
        known[0],
        known[1],
        key,
        cond=cond,
        x_T=x_T,
        jump_length=ip.jump_length,
        jump_n_sample=ip.jump_n_sample,
        sampler=stage.settings.sampler,
        eta=eta,
    )


def _decoder_stage(
    plan: Plan, variables, text, null, image_embeds, x_T, scales, key, out, learned, inputs
) -> jax.Array:
    stage = plan.decoder
    cond, uncond = decoder_conditions(stage.module, text, null, image_embeds, learned)
    known = None
    if plan.inpaint is not None:
        known = stage_inpaint_inputs(inputs, stage.size)
        if stage.module.in_channels != stage.module.image_channels:  # GLIDE's inpainting decoder: both branches
            extra = dict(inpaint_image=known[0], inpaint_mask=known[1][..., :1])
            cond, uncond = {**cond, **extra}, {**uncond, **extra}
    fn, c = _decoder_fn(stage, variables["decoder"], cond, uncond, scales["decoder"])
    if x_T is None:
        x_T = initial_noise(key, (image_embeds.shape[0], stage.size, stage.size, stage.module.image_channels))
    res = _stage_loop(plan, stage, fn, x_T, key, c, scales["decoder_eta"], known)
    if known is not None:
        res = known[1] * known[0] + (1.0 - known[1]) * res  # the known pixels are the source's
    x = res[0] if plan.return_intermediates else res
    if plan.return_intermediates:
        out["decoder_latents"], out["decoder_noise"] = x_T, res[1]["noise"]
    x = jnp.clip(x, -1.0, 1.0)
    _stage_done(plan, "decoder", stage.diffusion.num_timesteps, x)
    return x


def _upsampler_stage(plan: Plan, name: str, v_first, v_last, low_res, scales, key, out, inputs) -> jax.Array:
    stage: DiffusionStage = getattr(plan, name)
    first, last, diffusion, size = stage.module, stage.last_module, stage.diffusion, stage.size
    up = resize(low_res, size)
    last_t = diffusion.timestep_map[0]  # the network timestep of the final sampling step

    def denoise(x, t, low_res):
        run_first = lambda: first.apply(v_first, x, t, low_res).astype(jnp.float32)
        if last is None:
            return run_first()
        run_last = lambda: last.apply(v_last, x, t, low_res).astype(jnp.float32)
        # Karlo: super_res_first for all steps but the last, super_res_last for the last one.
        return jax.lax.cond(t[0] == last_t, run_last, run_first)

    x_T = initial_noise(key, (low_res.shape[0], size, size, low_res.shape[-1]))
    eta = scales[f"{name}_eta"]
    known = None if plan.inpaint is None else stage_inpaint_inputs(inputs, size)
    res = _stage_loop(plan, stage, denoise, x_T, key, dict(low_res=up), eta, known)
    x = res[0] if plan.return_intermediates else res
    if plan.return_intermediates:
        out[f"{name}_latents"], out[f"{name}_noise"] = x_T, res[1]["noise"]
    x = jnp.clip(x, -1.0, 1.0)
    _stage_done(plan, name, diffusion.num_timesteps, x)
    return x


# ----------------------------------------------------------------------------------------------------- program
def run_cascade(plan: Plan, variables: Mapping[str, Any], inputs: Mapping[str, Any], scales: Arrays, key) -> dict:
    """The whole cascade for one :class:`~unclip_jax.pipeline.plan.Plan` (traced; see the module docstring).

    Args:
        plan: the static plan.
        variables: each needed component's variables by component name.
        inputs: ``input_ids`` / ``mask`` [B, L] of the captions, ``null_ids`` / ``null_mask`` [1, L] of ``""``;
            ``image_embeds`` [B, D] (decode, invert), ``x_T`` (decode, optional), ``images`` (invert);
            ``inpaint_image`` [B, H, W, 3] / ``inpaint_mask`` [B, H, W, 1] (a plan that inpaints).
        scales: `unclip_jax.pipeline.settings.traced_values` of the settings.
        key: PRNG key.

    Returns:
        The outputs (see `UnclipPipeline.__call__`).
    """
    out: dict[str, jax.Array] = {}
    k_prior, k_dec, k_sr, k_1024 = jax.random.split(key, 4)
    enc = encode_text(plan.text_encoder, variables["text_encoder"], inputs["input_ids"])
    text = dict(
        text_embeds=enc["text_embeds"],
        last_hidden_state=enc["last_hidden_state"],
        mask=inputs["mask"],
        input_ids=inputs["input_ids"],
    )
    null_enc = encode_text(plan.text_encoder, variables["text_encoder"], inputs["null_ids"])
    null = dict(
        text_embeds=null_enc["text_embeds"], last_hidden_state=null_enc["last_hidden_state"], mask=inputs["null_mask"]
    )
    out["text_embeds"] = text["text_embeds"]
    b = text["text_embeds"].shape[0]

    if plan.mode == "invert":
        cond, uncond = decoder_conditions(plan.decoder.module, text, null, inputs["image_embeds"], False)
        fn, c = _decoder_fn(plan.decoder, variables["decoder"], cond, uncond, scales["decoder"])
        out["x_T"] = ddim_reverse_loop(plan.decoder.diffusion, fn, inputs["images"], cond=c)
        return out

    learned = False
    if plan.mode == "decode":
        z_i = inputs["image_embeds"]
    elif plan.prior is not None:
        n = plan.num_candidates
        z, extra = plan.prior.sample_image_embeds(
            variables["prior"],
            text,
            null,
            scales,
            k_prior,
            num_candidates=n,
            return_intermediates=plan.return_intermediates,
        )
        out.update(extra)
        _stage_done(plan, "prior", plan.prior.num_steps, z)
        z_i, chosen = keep_best_candidate(z, b, n, text["text_embeds"])
        out.update(chosen)
    elif plan.image_embed_source == "text":
        z_i = text["text_embeds"]  # section 5.1: the CLIP text embedding decoded as if it were an image embedding
    else:
        z_i = jnp.zeros((b, plan.decoder.module.clip_embeddings_dim), jnp.float32)
        learned = plan.image_embed_source == "learned"
    out["image_embeds"] = z_i
    if not plan.runs("decoder"):
        return out
    x = _decoder_stage(plan, variables, text, null, z_i, inputs.get("x_T"), scales, k_dec, out, learned, inputs)
    out["decoder_images"] = out["images"] = x
    if plan.runs("super_res"):
        v_first, v_last = variables["super_res_first"], variables.get("super_res_last")
        x = _upsampler_stage(plan, "super_res", v_first, v_last, x, scales, k_sr, out, inputs)
        out["super_res_images"] = out["images"] = x
    if plan.runs("upsampler_1024"):
        x = _upsampler_stage(plan, "upsampler_1024", variables["upsampler_1024"], None, x, scales, k_1024, out, inputs)
        out["upsampler_1024_images"] = out["images"] = x
    return out


class CascadeProgram:
    """:func:`run_cascade` jitted with the plan static; ``traces`` counts its traces (= compilations) in this
    process, so tests can check that a call with other prompts, seed or guidance scales does not recompile."""

    def __init__(self) -> None:
        self.traces = 0
        self._jitted = jax.jit(self._trace, static_argnames=("plan",))

    def _trace(self, plan: Plan, variables, inputs, scales, key):
        self.traces += 1
        return run_cascade(plan, variables, inputs, scales, key)

    def __call__(self, plan: Plan, variables, inputs, scales, key) -> dict[str, jax.Array]:
        return self._jitted(plan, variables, inputs, scales, key)

    def lower(self, plan: Plan, variables, inputs, scales, key) -> jax.stages.Lowered:
        """The program lowered for these arguments (arrays or ``jax.ShapeDtypeStruct`` s, possibly sharded): the
        ahead-of-time entry point (``.compile()`` it for a device topology)."""
        return self._jitted.lower(plan, variables, inputs, scales, key)


CASCADE = CascadeProgram()


def prng_key(seed: int | jax.Array) -> jax.Array:
    """A PRNG key from an int seed (a key is returned as is)."""
    return jax.random.PRNGKey(seed) if isinstance(seed, int | np.integer) else seed


class Program:
    """A :class:`~unclip_jax.pipeline.plan.Plan` bound to its variables and traced settings: ``program(inputs, seed)``.

    With a ``mesh`` of more than one device, the rows of the inputs (:data:`ROW_INPUTS`) are split over the mesh's
    first axis and the variables, the settings, the null caption and the key are replicated (placed once, here);
    the batch must then be a multiple of the mesh's size. A mesh program cannot report progress (ordered host
    callbacks compile for one device only).

    Args:
        plan: the static plan.
        variables: each component's variables (``make_plan``'s names).
        scales: `unclip_jax.pipeline.settings.traced_values` of the settings.
        mesh: optional device mesh (a one-device mesh is the same as none).
    """

    def __init__(self, plan: Plan, variables: Mapping[str, Any], scales: Arrays, mesh: jax.sharding.Mesh | None = None):
        self.plan = plan
        self.mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
        if self.mesh is not None:
            if plan.progress is not None:
                raise ValueError("a program sharded over several devices cannot report progress (progress=False)")
            P = jax.sharding.PartitionSpec
            self._replicated = jax.sharding.NamedSharding(self.mesh, P())
            self._rows = jax.sharding.NamedSharding(self.mesh, P(self.mesh.axis_names[0]))
            variables = jax.device_put(dict(variables), self._replicated)
            scales = jax.device_put(dict(scales), self._replicated)
        self.variables, self.scales = variables, scales

    def __call__(self, inputs: Mapping[str, Any], seed: int | jax.Array) -> dict[str, np.ndarray]:
        """Runs the program on ``inputs`` (see :func:`run_cascade`); returns its outputs as numpy arrays."""
        key = prng_key(seed)
        inputs = dict(inputs)
        if self.mesh is not None:
            inputs = {
                k: jax.device_put(v, self._rows if k in ROW_INPUTS else self._replicated) for k, v in inputs.items()
            }
            key = jax.device_put(key, self._replicated)
        out = jax.block_until_ready(CASCADE(self.plan, self.variables, inputs, self.scales, key))
        jax.effects_barrier()
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def trace_count() -> int:
    """How many times the cascade program has been traced (= compiled) in this process."""
    return CASCADE.traces
