"""The unCLIP pipeline: text -> CLIP -> prior -> decoder -> upsamplers (paper section 2), and its building blocks.

:class:`UnclipPipeline` holds the components (a network and its variables each) and each stage's training
diffusion, and turns a call into a plan (`unclip_jax.pipeline.plan.make_plan`) run as one compiled program
(`unclip_jax.pipeline.program`). The rooms of the package:

- `unclip_jax.pipeline.settings`: `StageSettings`, the defaults, each stage's default training diffusion.
- `unclip_jax.pipeline.plan`: the static `Plan` of one program.
- `unclip_jax.pipeline.priors` / `unclip_jax.pipeline.ar_prior`: the prior protocol and its two kinds.
- `unclip_jax.pipeline.program`: the stages as functions, the jitted cascade, `Program` (a bound, optionally
  batch-sharded plan: :meth:`UnclipPipeline.program` is the entry point of sharded generation).
- `unclip_jax.pipeline.ops`: CLIP encoding, the super-resolution resize, slerp.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion import GaussianDiffusion
from unclip_jax.pipeline.ops import encode_image, encode_text
from unclip_jax.pipeline.plan import ImageEmbedSource, InpaintMethod, InpaintSettings, ProgressFn, make_plan
from unclip_jax.pipeline.priors import prior_kind
from unclip_jax.pipeline.program import Program, print_progress, trace_count
from unclip_jax.pipeline.settings import STAGES, StageSettings, default_diffusion, resolve_settings, traced_values


@dataclasses.dataclass
class Component:
    """A linen module and its variables (``{'params': ..., maybe 'stats': ...}``, unboxed arrays)."""

    module: nn.Module
    variables: dict[str, Any]


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
        self._null_tokens: tuple[np.ndarray, np.ndarray] | None = None

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

    def text_inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The program's caption inputs: ``input_ids`` / ``mask`` of ``texts`` and ``null_ids`` / ``null_mask`` of
        the empty caption (the unconditional half of classifier-free guidance)."""
        ids, mask = self.tokenize(texts)
        if self._null_tokens is None:
            self._null_tokens = self.tokenize([""])
        null_ids, null_mask = self._null_tokens
        return dict(input_ids=ids, mask=mask, null_ids=null_ids, null_mask=null_mask)

    # ------------------------------------------------------------------ programs
    def program(
        self,
        mode: Literal["generate", "decode", "invert"] = "generate",
        settings: Mapping[str, StageSettings | None] | None = None,
        *,
        num_candidates: int = 2,
        image_embed_source: ImageEmbedSource = "prior",
        stop_after: str | None = None,
        decoder_clip_denoised: float | None | str = "default",
        return_intermediates: bool = False,
        progress: bool | ProgressFn = False,
        mesh: jax.sharding.Mesh | None = None,
        inpaint: InpaintSettings | None = None,
    ) -> Program:
        """The compiled-plan entry point: one call's plan bound to this pipeline's variables.

        ``program(inputs, seed)`` runs it (inputs: :meth:`text_inputs` plus ``image_embeds`` / ``x_T`` / ``images``
        for the other modes); it compiles on its first call per input shape and is shared with every other call of
        the same plan. With ``mesh`` the batch is split over the mesh's devices (see
        `unclip_jax.pipeline.program.Program`), giving the samples of the unsharded call.

        Args:
            mode: ``"generate"``, ``"decode"`` or ``"invert"`` (`unclip_jax.pipeline.plan.Plan`).
            settings: per-stage overrides of :data:`unclip_jax.pipeline.settings.DEFAULT_SETTINGS`.
            progress: True (print a line as each stage finishes), a callback ``(stage, steps)``, or False.
            mesh: optional device mesh.
            inpaint: inpainting settings (the program then reads ``inpaint_image`` / ``inpaint_mask``; see
                :meth:`inpaint`).
            Others: see :meth:`__call__`, :meth:`decode`.
        """
        full = resolve_settings(settings)
        modules = {name: None if c is None else c.module for name, c in self.components.items()}
        plan, names = make_plan(
            modules,
            self.diffusions,
            mode,
            full,
            num_candidates=num_candidates,
            image_embed_source=image_embed_source,
            stop_after=stop_after,
            decoder_clip_denoised=decoder_clip_denoised,
            return_intermediates=return_intermediates,
            progress=print_progress if progress is True else progress or None,
            inpaint=inpaint,
        )
        variables = {n: self.component(n).variables for n in names}
        return Program(plan, variables, traced_values(full), mesh)

    # ------------------------------------------------------------------ calls
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
        progress: bool | ProgressFn = False,
    ) -> dict[str, np.ndarray]:
        """Text-to-image sampling.

        Args:
            prompts: one caption or a list (a batch).
            seed: int seed or a PRNG key.
            num_images_per_prompt: each caption is repeated (``repeat_interleave``) this many times.
            settings: per-stage `StageSettings` overriding
                :data:`~unclip_jax.pipeline.settings.DEFAULT_SETTINGS` (keys of :data:`STAGES`).
            num_candidates: prior samples per image; the largest z_i . z_t is kept (paper: 2; Karlo: 1). Applies
                to the diffusion and the autoregressive prior alike.
            image_embed_source: "prior", "text" (decode z_t zero-shot, section 5.1), "zero" or "learned"
                (text-only decoding with a zero / the learned CFG image embedding).
            stop_after: last stage (default: the last loaded upsampler).
            return_intermediates: include x_T and per-step noise of every stage.
            progress: print a line as each stage finishes (True) or call ``progress(stage, steps)``; a program with
                progress callbacks is compiled apart from one without.

        Returns:
            numpy dict: ``images`` [B, H, W, 3] in [-1, 1] (the last stage's output), ``decoder_images``,
            ``super_res_images`` / ``upsampler_1024_images`` when run, ``image_embeds`` [B, D], ``text_embeds``,
            and with the prior ``candidates`` [B, N, D], ``candidate_scores`` [B, N], ``candidate_index`` [B]
            (with the autoregressive prior also ``prior_codes`` [B, N, k] and ``prior_dot_tokens`` [B, N]).
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [t for t in texts for _ in range(num_images_per_prompt)]
        program = self.program(
            "generate",
            settings,
            num_candidates=num_candidates,
            image_embed_source=image_embed_source,
            stop_after=stop_after,
            return_intermediates=return_intermediates,
            progress=progress,
        )
        return program(self.text_inputs(texts), seed)

    def inpaint(
        self,
        image: np.ndarray | jax.Array,
        mask: np.ndarray | jax.Array,
        prompts: str | Sequence[str],
        *,
        method: InpaintMethod = "repaint",
        jump_length: int = 10,
        jump_n_sample: int = 10,
        seed: int | jax.Array = 0,
        settings: Mapping[str, StageSettings | None] | None = None,
        num_candidates: int = 2,
        image_embed_source: ImageEmbedSource = "prior",
        stop_after: str | None = None,
        progress: bool | ProgressFn = False,
    ) -> dict[str, np.ndarray]:
        """Text-guided inpainting through the cascade: the masked region of ``image`` is generated under the caption,
        the rest kept (every stage keeps the unmasked pixels, so the final image equals the source there).

        The prior samples z_i from the caption as in :meth:`__call__`; the decoder inpaints with RePaint resampling
        (``method="repaint"``, any decoder; Lugmayr et al. 2022) or GLIDE's fine-tuned inpainting decoder
        (``"model"``); the upsamplers inpaint with RePaint. See `unclip_jax.pipeline.inpaint` for the checks.

        Args:
            image: ``[H, W, 3]`` or ``[B, H, W, 3]`` in [-1, 1], square; resized to each stage's size (at the last
                stage's size it is used as given).
            mask: ``[H, W]``, ``[H, W, 1]`` or ``[B, H, W, 1]``: 1 (>= 0.5) keeps the pixel, 0 inpaints it.
            prompts: one caption (for every row) or one per row.
            method, jump_length, jump_n_sample: :class:`~unclip_jax.pipeline.plan.InpaintSettings`.
            Others as :meth:`__call__`.

        Returns:
            numpy dict as :meth:`__call__` (``images`` etc.), plus ``mask`` [B, H, W, 1] (binarised) and ``source``.
        """
        from unclip_jax.pipeline.inpaint import prepare_inpaint_inputs

        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        image, mask = prepare_inpaint_inputs(image, mask, len(texts))
        if len(texts) == 1 and image.shape[0] > 1:
            texts = texts * image.shape[0]
        program = self.program(
            "generate",
            settings,
            num_candidates=num_candidates,
            image_embed_source=image_embed_source,
            stop_after=stop_after,
            progress=progress,
            inpaint=InpaintSettings(method, jump_length, jump_n_sample),
        )
        out = program(dict(self.text_inputs(texts), inpaint_image=image, inpaint_mask=mask), seed)
        return {**out, "mask": np.asarray(mask), "source": np.asarray(image)}

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
        progress: bool | ProgressFn = False,
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
        program = self.program(
            "decode", settings, stop_after=stop_after, decoder_clip_denoised=decoder_clip_denoised, progress=progress
        )
        inputs = dict(self.text_inputs(texts), image_embeds=z)
        if x_T is not None:
            inputs["x_T"] = jnp.asarray(x_T, jnp.float32)
        return program(inputs, seed)

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
        s = resolve_settings(settings)
        s["decoder"] = dataclasses.replace(s["decoder"], sampler="ddim", eta=0.0)  # only steps and guidance matter
        program = self.program("invert", s, stop_after="decoder", decoder_clip_denoised=None)
        inputs = dict(self.text_inputs(texts), images=images, image_embeds=jnp.asarray(image_embeds, jnp.float32))
        return program(inputs, 0)["x_T"]

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
