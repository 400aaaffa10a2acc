"""The CLIP-conditioned decoder of unCLIP (paper section 2.1): text projection + GLIDE/ADM U-Net.

Three modules:

- :class:`UnCLIPTextProj` (diffusers ``UnCLIPTextProjModel`` numerics): turns the CLIP image
  embedding z_i, the CLIP text embedding z_t and the caption hidden states into (a) an
  additive time embedding ``embedding_proj(z_t) + clip_image_embeddings_project_to_time_embeddings(z_i)``
  and (b) the attention context ``[4 tokens from z_i ; LayerNorm(proj(caption states))]``.
  The 4 tokens come from one Dense of width ``4 * C`` whose output is read as [C, 4]
  (diffusers: ``reshape(B, -1, 4).permute(0, 2, 1)``), i.e. token j, channel c is output
  ``c * 4 + j``; the parameter keeps that memory order so Karlo weights load unchanged.
  ``learned_classifier_free_guidance_embeddings`` replaces z_i for the unconditional branch
  (section 2.1: "randomly setting the CLIP embeddings to zero (or a learned embedding) 10%
  of the time").
- :class:`Decoder` (diffusers ``UNet2DConditionModel`` numerics in the Karlo configuration):
  the U-Net of :mod:`unclip_jax.models.unet` with its attention on: scale-shift norm, resblock
  up/down-sampling, GLIDE attention whose keys/values include the context, and
  ``class_labels`` added to the timestep embedding (diffusers ``class_embed_type="identity"``).
  Output: 6 channels = eps and the learned-range variance interpolation v (improved DDPM,
  Nichol & Dhariwal 2021).
- :class:`UnCLIPDecoder`: both together, with the classifier-free-guidance dropouts of
  training (CLIP embedding -> learned embedding, caption -> a given null caption).

Configuration names are guided-diffusion's (see :mod:`unclip_jax.models.unet`);
``attention_resolutions`` are *downsampling factors* (1 = the input resolution, 2 = the
first downsampled level, ...; the paper's "32,16,8" at 64x64 is (2, 4, 8));
``num_head_channels`` is diffusers' ``attention_head_dim``; ``context_dim`` is
``cross_attention_dim``. Inputs are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers import axes
from unclip_jax.layers.transformer import dense, layer_norm
from unclip_jax.models.glide_text import CLIP_VOCAB_SIZE, GlideTextEncoder, empty_caption
from unclip_jax.models.unet import AttentionUNetFields, UNetModel

Dtype = Any

TEXT_ENCODERS = ("clip", "glide")  # UnCLIPDecoder.text_encoder: Karlo's frozen CLIP caption states, the paper's GLIDE
INPAINT_CHANNELS = 4  # GLIDE's inpainting decoder: x_t plus the masked image (3) and the mask (1)

VARIANTS: dict[str, dict[str, Any]] = {
    # Compiles and runs in seconds on CPU; pairs with clip.VARIANTS["test"] (CLIP width 32).
    "test": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_head_channels=16,
        context_dim=32,
        norm_num_groups=8,
        clip_embeddings_dim=32,
        sample_size=16,
    ),
    # The CPU demo (unclip_jax.demo, experiments/decoder.py:tiny): 32x32, block channels (16, 32, 64), attention at
    # 16x16 and 8x8 (the caption reaches the finer level too), fixed variance (3 output channels); pairs with the
    # demo CLIP (experiments/clip.py:tiny: width 64). Trained for the demo's minutes it leans on z_i far more than
    # on the caption (shape and position of the demo's samples stay near chance: see the README's demo caption).
    "tiny": dict(
        out_channels=3,
        model_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        num_head_channels=32,
        context_dim=64,
        norm_num_groups=8,
        clip_embeddings_dim=64,
        sample_size=32,
    ),
    # Benchmark size (64x64): block channels (64, 128, 192, 256), attention in the 3 inner levels.
    "bench": dict(
        model_channels=64,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(2, 4, 8),
        num_head_channels=32,
        context_dim=256,
        clip_embeddings_dim=256,
        sample_size=64,
    ),
    # kakaobrain/karlo-v1-alpha decoder + text_proj (diffusers config), ~900M parameters.
    "karlo": dict(
        model_channels=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(2, 4, 8),
        num_head_channels=64,
        context_dim=1536,
        clip_embeddings_dim=768,
        sample_size=64,
    ),
    # Appendix C: 512 channels, mult 1,2,3,4, 3 res blocks, attention at 32,16,8, 64 channels per head,
    # caption context width 2048, 1024-dim CLIP (ViT-H/16), dropout 0.1 (GLIDE 3.5B class). With
    # text_encoder="glide" (experiments/decoder.py:paper) it gets the caption transformer of GLIDE_TEXT["paper"].
    "paper": dict(
        model_channels=512,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_resolutions=(2, 4, 8),
        num_head_channels=64,
        context_dim=2048,
        clip_embeddings_dim=1024,
        dropout=0.1,
        sample_size=64,
    ),
}

# GLIDE's caption transformer per variant, used with text_encoder="glide" (:func:`build`); xf_width = context_dim.
GLIDE_TEXT: dict[str, dict[str, Any]] = {
    "test": dict(text_ctx=77, xf_width=32, xf_layers=2, xf_heads=2),  # experiments/decoder.py:test_glide
    "tiny": dict(text_ctx=77, xf_width=64, xf_layers=2, xf_heads=4),  # experiments/decoder.py:tiny_glide
    # Table 3: "Text encoder ctx/width/depth/heads 256/2048/24/32" (experiments/decoder.py:paper).
    "paper": dict(text_ctx=256, xf_width=2048, xf_layers=24, xf_heads=32),
}


class UnCLIPTextProj(nn.Module):
    """CLIP embeddings -> decoder conditioning (diffusers ``UnCLIPTextProjModel``; Karlo ``text_seq_proj`` etc.).

    Attributes:
      clip_embeddings_dim: size of z_i, z_t and of the caption hidden states.
      time_embed_dim: size of the U-Net's timestep embedding.
      cross_attention_dim: context width of the U-Net.
      clip_extra_context_tokens: number of tokens made from z_i (4).
      layer_norm_eps: eps of ``text_encoder_hidden_states_norm`` (torch default 1e-5).
      text_encoder: ``"clip"`` (Karlo: z_t and the CLIP caption states are projected here) or ``"glide"`` (the
        paper: ``text_embeds`` is GLIDE's ``xf_proj``, already of the time-embedding width, and
        ``text_hidden_states`` its token states, already of the context width; both are used as they are).
    """

    clip_embeddings_dim: int = 768
    time_embed_dim: int = 1280
    cross_attention_dim: int = 1536
    clip_extra_context_tokens: int = 4
    layer_norm_eps: float = 1e-5
    text_encoder: str = "clip"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_embeds: jnp.ndarray,
        text_embeds: jnp.ndarray,
        text_hidden_states: jnp.ndarray,
        do_classifier_free_guidance: bool = False,
        drop_image_embeds: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Builds the decoder context and the additive time embedding.

        Args:
          image_embeds: [B, D] CLIP image embeddings z_i (or [B/2, D] with
            ``do_classifier_free_guidance``: the learned embedding is prepended for the
            unconditional half, as diffusers does).
          text_embeds: [B, D] CLIP text embeddings z_t.
          text_hidden_states: [B, L, D] CLIP caption hidden states.
          do_classifier_free_guidance: prepend B/2 copies of the learned embedding.
          drop_image_embeds: optional [B] bool; True replaces z_i by the learned embedding
            (training-time classifier-free-guidance dropout, paper section 2.1).

        Returns:
          context [B, 4 + L, cross_attention_dim] and additive time embedding [B, time_embed_dim].
        """
        cf = self.param(
            "learned_classifier_free_guidance_embeddings",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
            (self.clip_embeddings_dim,),
            self.param_dtype,
        )
        image_embeds = image_embeds.astype(self.dtype)
        if drop_image_embeds is not None:
            image_embeds = jnp.where(drop_image_embeds[:, None], cf.astype(self.dtype)[None], image_embeds)
        if do_classifier_free_guidance:
            uncond = jnp.broadcast_to(cf.astype(self.dtype)[None], image_embeds.shape)
            image_embeds = jnp.concatenate([uncond, image_embeds], axis=0)
        b = text_embeds.shape[0]
        if image_embeds.shape[0] != b:
            raise ValueError(f"UnCLIPTextProj: {image_embeds.shape[0]} image embeddings for {b} text embeddings")

        def proj(features, name):
            return dense(features, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, name)

        glide = self.text_encoder == "glide"
        text_time = (
            text_embeds.astype(self.dtype) if glide else proj(self.time_embed_dim, "embedding_proj")(text_embeds)
        )
        time_emb = text_time + proj(self.time_embed_dim, "clip_image_embeddings_project_to_time_embeddings")(
            image_embeds
        )
        n, c = self.clip_extra_context_tokens, self.cross_attention_dim
        tokens = proj(n * c, "clip_extra_context_tokens_proj")(image_embeds)
        tokens = tokens.reshape(b, c, n).transpose(0, 2, 1)
        if glide:
            states = text_hidden_states.astype(self.dtype)
        else:
            states = proj(c, "encoder_hidden_states_proj")(text_hidden_states)
            states = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "text_encoder_hidden_states_norm")(
                states
            )
        context = jnp.concatenate([tokens.astype(states.dtype), states], axis=1)
        context = nn.with_logical_constraint(context, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        return context, time_emb


class Decoder(AttentionUNetFields, UNetModel):
    """The CLIP-conditioned ADM/GLIDE U-Net (diffusers ``UNet2DConditionModel``, Karlo decoder family).

    :class:`unclip_jax.models.unet.UNetModel` with GLIDE attention whose keys/values include the
    context (fields: :class:`~unclip_jax.models.unet.UNetFields` and
    :class:`~unclip_jax.models.unet.AttentionUNetFields`). Called as
    ``(x_t [B, H, W, 3], t [B], context [B, S, context_dim], class_labels [B, temb_dim] | None,
    context_mask [B, S] | None, deterministic)`` -> [B, H, W, out_channels]; ``class_labels`` is the
    additive embedding of :class:`UnCLIPTextProj`.
    """


class UnCLIPDecoder(AttentionUNetFields):
    """Text projection + U-Net: the whole trainable decoder of unCLIP (paper section 2.1).

    Parameters live under ``text_proj`` (:class:`UnCLIPTextProj`) and ``unet``
    (:class:`Decoder`); the fields are the U-Net's
    (:class:`~unclip_jax.models.unet.AttentionUNetFields`) plus the two below.

    With ``text_encoder="glide"`` (the paper's decoder, section 2.1) the caption is encoded by GLIDE's transformer
    trained with the U-Net (:class:`unclip_jax.models.glide_text.GlideTextEncoder`, parameters under ``text_encoder``)
    from the caption token ids: its last state is added to the timestep embedding, its token states (width
    ``xf_width`` = ``context_dim``, GLIDE's ``encoder_channels``) follow the 4 CLIP tokens in the context, with no
    context mask (GLIDE attends over every position; padding has its learned embedding). z_t is not used (the paper
    conditions the decoder on z_i and the caption).

    GLIDE's inpainting model (``InpaintText2ImUNet``) is this decoder with ``in_channels = 3 + 4``: the masked
    image and the mask are concatenated to x_t (``inpaint_image``, ``inpaint_mask``).

    Attributes:
      clip_embeddings_dim: size of z_i, z_t and of the caption hidden states.
      clip_extra_context_tokens: number of context tokens made from z_i (4).
      text_encoder: ``"clip"`` (frozen CLIP caption states, Karlo) or ``"glide"`` (the paper).
      text_ctx, xf_width, xf_layers, xf_heads, xf_final_ln, xf_padding, xf_vocab_size: the GLIDE caption
        transformer (``text2im_model.py`` names; only with ``text_encoder="glide"``).
    """

    clip_embeddings_dim: int = 768
    clip_extra_context_tokens: int = 4
    text_encoder: str = "clip"
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    xf_vocab_size: int = CLIP_VOCAB_SIZE

    @property
    def glide(self) -> bool:
        """Whether the caption goes through GLIDE's jointly trained transformer."""
        return self.text_encoder == "glide"

    @property
    def image_channels(self) -> int:
        """Channels of the image x_t (the rest of ``in_channels`` are the inpainting inputs)."""
        return self.in_channels - INPAINT_CHANNELS if self.in_channels > 3 + 1 else self.in_channels

    def unet_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of the :class:`Decoder` inside."""
        return AttentionUNetFields.fields_of(self)

    def text_proj_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of the :class:`UnCLIPTextProj` inside."""
        return dict(
            clip_embeddings_dim=self.clip_embeddings_dim,
            time_embed_dim=self.temb_dim,
            cross_attention_dim=self.context_dim,
            clip_extra_context_tokens=self.clip_extra_context_tokens,
            text_encoder=self.text_encoder,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def text_encoder_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs of the :class:`~unclip_jax.models.glide_text.GlideTextEncoder` inside."""
        return dict(
            text_ctx=self.text_ctx,
            xf_width=self.xf_width,
            xf_layers=self.xf_layers,
            xf_heads=self.xf_heads,
            xf_final_ln=self.xf_final_ln,
            xf_padding=self.xf_padding,
            vocab_size=self.xf_vocab_size,
            time_embed_dim=self.temb_dim,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def setup(self):
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"UnCLIPDecoder.text_encoder={self.text_encoder!r}: expected one of {TEXT_ENCODERS}")
        if self.glide and self.xf_width != self.context_dim:
            raise ValueError(
                f"UnCLIPDecoder: xf_width={self.xf_width} must equal context_dim={self.context_dim} "
                "(GLIDE: the attention layers' encoder_channels are the transformer's width)"
            )
        self.text_proj = UnCLIPTextProj(**self.text_proj_kwargs())
        if self.glide:
            self.text_encoder_module = GlideTextEncoder(**self.text_encoder_kwargs(), name="text_encoder")
        self.unet = Decoder(**self.unet_kwargs())

    def __call__(
        self,
        x_t: jnp.ndarray,
        t: jnp.ndarray,
        image_embeds: jnp.ndarray,
        text_embeds: jnp.ndarray | None = None,
        text_hidden_states: jnp.ndarray | None = None,
        text_mask: jnp.ndarray | None = None,
        drop_image_embeds: jnp.ndarray | None = None,
        drop_caption: jnp.ndarray | None = None,
        null_caption: tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray] | None = None,
        deterministic: bool = True,
        input_ids: jnp.ndarray | None = None,
        inpaint_image: jnp.ndarray | None = None,
        inpaint_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """Predicts eps and the variance interpolation given CLIP conditioning.

        Args:
          x_t: [B, H, W, 3] noisy images.
          t: [B] timesteps.
          image_embeds: [B, D] CLIP image embeddings z_i.
          text_embeds: [B, D] CLIP text embeddings z_t (``"clip"`` text encoder; unused by ``"glide"``).
          text_hidden_states: [B, L, D] CLIP caption hidden states (``"clip"`` only).
          text_mask: optional [B, L] bool caption mask (True = real token); the 4 CLIP
            tokens are always visible.
          drop_image_embeds: optional [B] bool: use the learned null embedding for z_i
            (classifier-free guidance training, 10% in the paper).
          drop_caption: optional [B] bool: use ``null_caption`` instead of the caption
            (50% in the paper); with ``"glide"`` the empty caption
            (:func:`unclip_jax.models.glide_text.empty_caption`).
          null_caption: (text_embeds [1|B, D], text_hidden_states [1|B, L, D], text_mask
            [1|B, L]) of the empty caption (what the sampler's unconditional branch
            uses: the CLIP encoding of ""). Required with ``drop_caption`` (``"clip"`` only).
          deterministic: disables dropout.
          input_ids: [B, L] caption token ids (``"glide"``).
          inpaint_image, inpaint_mask: [B, H, W, 3] image in [-1, 1] and [B, H, W, 1] mask (1 = known pixel) of an
            inpainting decoder (``in_channels = 7``): ``[x_t, image * mask, mask]`` enter the U-Net (GLIDE
            ``InpaintText2ImUNet``).

        Returns:
          [B, H, W, out_channels].
        """
        if self.in_channels != x_t.shape[-1]:
            if inpaint_image is None or inpaint_mask is None:
                raise ValueError(
                    f"UnCLIPDecoder: in_channels={self.in_channels} for a {x_t.shape[-1]}-channel x_t needs "
                    "inpaint_image and inpaint_mask"
                )
            m = inpaint_mask.astype(x_t.dtype)
            x_t = jnp.concatenate([x_t, inpaint_image.astype(x_t.dtype) * m, m], axis=-1)
        if self.glide:
            return self._glide_call(
                x_t, t, image_embeds, input_ids, text_mask, drop_image_embeds, drop_caption, deterministic
            )
        b, length = text_hidden_states.shape[:2]
        if text_mask is None:
            text_mask = jnp.ones((b, length), bool)
        if drop_caption is not None:
            if null_caption is None:
                raise ValueError("UnCLIPDecoder: drop_caption needs null_caption=(text_embeds, hidden_states, mask)")
            n_emb, n_states, n_mask = null_caption
            d = drop_caption.astype(bool)
            text_embeds = jnp.where(d[:, None], n_emb.astype(text_embeds.dtype), text_embeds)
            text_hidden_states = jnp.where(
                d[:, None, None], n_states.astype(text_hidden_states.dtype), text_hidden_states
            )
            text_mask = jnp.where(d[:, None], n_mask.astype(bool), text_mask.astype(bool))
        context, time_emb = self.text_proj(
            image_embeds, text_embeds, text_hidden_states, drop_image_embeds=drop_image_embeds
        )
        mask = jnp.concatenate([jnp.ones((b, self.clip_extra_context_tokens), bool), text_mask.astype(bool)], axis=1)
        return self.unet(x_t, t, context, class_labels=time_emb, context_mask=mask, deterministic=deterministic)

    def _glide_call(self, x_t, t, image_embeds, input_ids, text_mask, drop_image_embeds, drop_caption, deterministic):
        if input_ids is None:
            raise ValueError('UnCLIPDecoder(text_encoder="glide") needs the caption token ids (input_ids)')
        b, length = input_ids.shape
        if text_mask is None:
            text_mask = jnp.ones((b, length), bool)
        text_mask = text_mask.astype(bool)
        if drop_caption is not None:
            null_ids, null_mask = empty_caption(b, length)
            d = drop_caption.astype(bool)[:, None]
            input_ids = jnp.where(d, null_ids, input_ids)
            text_mask = jnp.where(d, null_mask, text_mask)
        xf_proj, xf_out = self.text_encoder_module(input_ids, text_mask)
        context, time_emb = self.text_proj(image_embeds, xf_proj, xf_out, drop_image_embeds=drop_image_embeds)
        return self.unet(x_t, t, context, class_labels=time_emb, context_mask=None, deterministic=deterministic)


def widen_input_conv(params: Any, in_channels: int) -> Any:
    """``params`` of an :class:`UnCLIPDecoder` with ``unet/conv_in``'s kernel [3, 3, C, W] zero-padded to
    ``in_channels`` input channels (GLIDE's inpainting decoder from a trained decoder: with zero weights on the new
    channels the widened network computes the same function until fine-tuning moves them)."""
    kernel = params["unet"]["conv_in"]["kernel"]
    extra = in_channels - kernel.shape[-2]
    if extra < 0:
        raise ValueError(f"widen_input_conv: conv_in has {kernel.shape[-2]} input channels, more than {in_channels}")
    pad = jnp.zeros((*kernel.shape[:-2], extra, kernel.shape[-1]), kernel.dtype)
    conv_in = {**params["unet"]["conv_in"], "kernel": jnp.concatenate([jnp.asarray(kernel), pad], axis=-2)}
    return {**params, "unet": {**params["unet"], "conv_in": conv_in}}


def build(variant: str, **overrides: Any) -> UnCLIPDecoder:
    """Builds an :class:`UnCLIPDecoder` (text projection + U-Net) from :data:`VARIANTS` with overrides; with
    ``text_encoder="glide"`` the variant's caption transformer of :data:`GLIDE_TEXT` comes in under the overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"decoder variant {variant!r}: expected one of {sorted(VARIANTS)}")
    glide = GLIDE_TEXT.get(variant, {}) if overrides.get("text_encoder") == "glide" else {}
    return UnCLIPDecoder(**{**VARIANTS[variant], **glide, **overrides})
