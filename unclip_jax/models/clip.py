"""CLIP text and vision towers (Radford et al. 2021), numerics of transformers' CLIP.

unCLIP (Ramesh et al. 2022, section 2) conditions everything on a frozen CLIP: the text
tower gives the caption hidden states and the text embedding z_t, the vision tower the
image embedding z_i. The layout follows transformers ``CLIPTextModelWithProjection`` and
``CLIPVisionModelWithProjection`` (OpenAI family: quick-GELU, pre-LN blocks, LayerNorm
eps 1e-5), so OpenAI's ViT-L/14 imports bit for bit (``unclip_jax/convert/clip.py``).

- Text: token + learned position embeddings -> causal transformer -> final LayerNorm;
  pooled at the end-of-text token (``argmax(input_ids)`` for configs with
  ``eos_token_id == 2``, as transformers does for the OpenAI checkpoints; otherwise the
  first occurrence of ``eos_token_id``) -> ``text_projection`` (no bias).
- Vision: patch convolution (no bias) + class token + learned positions -> ``pre_layrnorm``
  -> transformer -> ``post_layernorm`` of the class token -> ``visual_projection``.
  ``stem="conv"`` replaces the patch convolution by the convolutional stem of Xiao et al. 2021
  ("Early Convolutions Help Transformers See Better"): log2(patch_size) 3x3 stride-2 convolutions
  (GroupNorm, ReLU) and a 1x1 projection to the width. Small ViTs trained briefly see local
  structure (edges, corners: the shapes of the demo's dataset) through it that a linear patch
  embedding learns slowly; it has no transformers counterpart (native format only).
- :class:`CLIP` joins both with a learned ``logit_scale`` (init log(1/0.07)) for
  contrastive training from scratch.

Images are NHWC, already resized and normalised with :data:`CLIP_MEAN` / :data:`CLIP_STD`
(:func:`preprocess_images`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from unclip_jax.layers import axes
from unclip_jax.layers.attention import combine_masks, make_causal_mask, make_padding_mask
from unclip_jax.layers.transformer import Transformer, dense, layer_norm

Dtype = Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VARIANTS: dict[str, dict[str, Any]] = {
    # Seconds on CPU; projection 32 pairs with prior.VARIANTS["test"].
    "test": dict(
        projection_dim=32,
        text=dict(width=32, layers=2, heads=2, mlp_dim=64, context_length=77),
        vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64),
    ),
    # Small CPU-trainable CLIP for the 64x64 synthetic captioned-shapes demo; pairs with prior "bench".
    "tiny": dict(
        projection_dim=256,
        text=dict(width=256, layers=4, heads=4, mlp_dim=1024, context_length=77),
        vision=dict(image_size=64, patch_size=8, width=256, layers=4, heads=4, mlp_dim=1024),
    ),
    # openai/clip-vit-large-patch14 (Karlo's CLIP): ViT-L/14 @ 224, text 768 x 12, projection 768.
    "karlo": dict(
        projection_dim=768,
        text=dict(width=768, layers=12, heads=12, mlp_dim=3072, context_length=77),
        vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
    ),
    # The paper's CLIP (section 2, appendix C): ViT-H/16 @ 256 (1280 x 32), text 1024 x 24, projection 1024.
    "paper": dict(
        projection_dim=1024,
        text=dict(width=1024, layers=24, heads=16, mlp_dim=4096, context_length=77),
        vision=dict(image_size=256, patch_size=16, width=1280, layers=32, heads=16, mlp_dim=5120),
    ),
}


def _check_heads(where: str, width: int, heads: int) -> int:
    if width % heads:
        raise ValueError(f"{where}: width {width} is not divisible by heads {heads}")
    return width // heads


class CLIPTextModel(nn.Module):
    """CLIP text tower with projection (transformers ``CLIPTextModelWithProjection``).

    Attributes:
      vocab_size: BPE vocabulary (49408).
      context_length: number of learned positions (77).
      width, layers, heads, mlp_dim: transformer shape (hidden_size, num_hidden_layers,
        num_attention_heads, intermediate_size).
      projection_dim: size of ``text_embeds``.
      act: "quick_gelu" (OpenAI) or "gelu".
      layer_norm_eps: LayerNorm epsilon.
      eos_token_id: 2 selects argmax pooling (OpenAI configs); otherwise the first
        occurrence of this id is pooled.
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    projection_dim: int = 512
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None, deterministic: bool = True
    ) -> dict[str, jnp.ndarray]:
        """Encodes token ids.

        Args:
          input_ids: [B, L] int token ids (L <= context_length).
          attention_mask: optional [B, L] bool padding mask (the causal mask is always on;
            with causal attention and end-of-text pooling the padding mask does not change
            ``text_embeds``; the diffusers/Karlo pipelines pass none).
          deterministic: unused (no dropout); kept for a uniform signature.

        Returns:
          dict with ``text_embeds`` [B, projection_dim], ``last_hidden_state`` [B, L, width]
          (after the final LayerNorm) and ``pooled_output`` [B, width].
        """
        b, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(f"CLIPTextModel: {length} tokens exceed context_length={self.context_length}")
        head_dim = _check_heads("CLIPTextModel", self.width, self.heads)
        tok = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
            name="token_embedding",
        )(input_ids)
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), (axes.POSITION, axes.EMBED)),
            (self.context_length, self.width),
            self.param_dtype,
        )
        x = (tok + pos[None, :length].astype(self.dtype)).astype(self.dtype)
        pad = make_padding_mask(attention_mask) if attention_mask is not None else None
        mask = combine_masks(make_causal_mask(length), pad)
        x = Transformer(
            num_layers=self.layers,
            num_heads=self.heads,
            head_dim=head_dim,
            mlp_dim=self.mlp_dim,
            act=self.act,
            layer_norm_eps=self.layer_norm_eps,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="encoder",
        )(x, mask, deterministic)
        x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)
        if self.eos_token_id == 2:
            eot = jnp.argmax(input_ids.astype(jnp.int32), axis=-1)
        else:
            eot = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        text_embeds = dense(
            self.projection_dim, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "text_projection", use_bias=False
        )(pooled)
        return dict(text_embeds=text_embeds, last_hidden_state=x, pooled_output=pooled)


def _conv(features: int, size: int, stride: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    """A bias-free convolution; ``size == stride`` is a patchify (VALID), otherwise 'same' padding."""
    return nn.Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding="VALID" if size == stride else ((size // 2, size // 2), (size // 2, size // 2)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)
        ),
        name=name,
    )


class ConvStem(nn.Module):
    """The convolutional stem of Xiao et al. 2021 in place of a ``patch_size`` patchify.

    log2(patch_size) 3x3 stride-2 convolutions (channels doubling up to ``width``), each followed by GroupNorm
    (the paper's BatchNorm without batch statistics) and ReLU, then a 1x1 projection to ``width``:
    [B, H, W, C] -> [B, H/p, W/p, width], the token grid of the patch convolution it replaces.
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        p = self.patch_size
        depth = p.bit_length() - 1
        if p < 2 or 1 << depth != p:
            raise ValueError(f"CLIPVisionModel: stem='conv' needs a power-of-two patch_size >= 2, got {p}")
        for i in range(depth):
            features = max(self.width >> (depth - 1 - i), 8)
            x = _conv(features, 3, 2, self.dtype, self.param_dtype, f"conv_{i}")(x)
            norm = nn.GroupNorm(min(8, features), dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")
            x = nn.relu(norm(x))
        return _conv(self.width, 1, 1, self.dtype, self.param_dtype, "proj")(x)


class CLIPVisionModel(nn.Module):
    """CLIP ViT image tower with projection (transformers ``CLIPVisionModelWithProjection``).

    Attributes:
      image_size, patch_size, num_channels: input geometry ([B, image_size, image_size, C]).
      stem: ``"patch"`` (CLIP's patch convolution, transformers' layout) or ``"conv"`` (Xiao et al. 2021's
        convolutional stem; same token grid, needs a power-of-two ``patch_size``).
      width, layers, heads, mlp_dim: transformer shape.
      projection_dim: size of ``image_embeds``.
      act, layer_norm_eps: as in :class:`CLIPTextModel`.
    """

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    stem: str = "patch"
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    projection_dim: int = 512
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray, deterministic: bool = True) -> dict[str, jnp.ndarray]:
        """Encodes images.

        Args:
          pixel_values: [B, image_size, image_size, num_channels], CLIP-normalised.
          deterministic: unused (no dropout).

        Returns:
          dict with ``image_embeds`` [B, projection_dim], ``last_hidden_state``
          [B, 1 + (image_size/patch_size)^2, width] and ``pooled_output`` [B, width].
        """
        b, h, w, c = pixel_values.shape
        if (h, w, c) != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(
                f"CLIPVisionModel: pixel_values [B, H, W, C] = {pixel_values.shape}, expected "
                f"[B, {self.image_size}, {self.image_size}, {self.num_channels}] (NHWC)"
            )
        head_dim = _check_heads("CLIPVisionModel", self.width, self.heads)
        x = pixel_values.astype(self.dtype)
        if self.stem == "patch":
            x = _conv(self.width, self.patch_size, self.patch_size, self.dtype, self.param_dtype, "patch_embedding")(x)
        elif self.stem == "conv":
            x = ConvStem(self.patch_size, self.width, self.dtype, self.param_dtype, name="stem")(x)
        else:
            raise ValueError(f"CLIPVisionModel: stem={self.stem!r}, expected 'patch' or 'conv'")
        x = x.reshape(b, -1, self.width)
        cls = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.width**-0.5), (axes.EMBED,)),
            (self.width,),
            self.param_dtype,
        )
        n = x.shape[1] + 1
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.POSITION, axes.EMBED)),
            (n, self.width),
            self.param_dtype,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        x = x + pos[None].astype(self.dtype)
        x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(x)
        x = Transformer(
            num_layers=self.layers,
            num_heads=self.heads,
            head_dim=head_dim,
            mlp_dim=self.mlp_dim,
            act=self.act,
            layer_norm_eps=self.layer_norm_eps,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="encoder",
        )(x, None, deterministic)
        pooled = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "post_layernorm")(x[:, 0])
        image_embeds = dense(
            self.projection_dim, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "visual_projection", use_bias=False
        )(pooled)
        return dict(image_embeds=image_embeds, last_hidden_state=x, pooled_output=pooled)


class CLIP(nn.Module):
    """Both CLIP towers and the contrastive temperature (transformers ``CLIPModel`` layout).

    Attributes:
      projection_dim: shared embedding size.
      text: :class:`CLIPTextModel` kwargs (without projection_dim/dtype).
      vision: :class:`CLIPVisionModel` kwargs (without projection_dim/dtype).
      logit_scale_init: initial log temperature, log(1/0.07) (Radford et al. 2021, section 2.5).
    """

    projection_dim: int = 512
    text: Mapping[str, Any] = None  # type: ignore[assignment]
    vision: Mapping[str, Any] = None  # type: ignore[assignment]
    logit_scale_init: float = math.log(1 / 0.07)
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # Tower kwargs arrive as dicts (variant tables, native config.json): freeze them so that the module stays
        # hashable, as jit's static arguments and the pipeline's compiled-function caches need.
        for name in ("text", "vision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, FrozenDict):
                object.__setattr__(self, name, FrozenDict(value))
        super().__post_init__()

    def tower_kwargs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Constructor kwargs of the text and the vision tower: each tower's own fields plus the shared ones.

        A tower built from them on its own is the ``text_encoder`` / ``image_encoder`` component of a pipeline
        with the parameters under ``text_model`` / ``vision_model``.
        """
        common = dict(
            projection_dim=self.projection_dim, remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype
        )
        return {**dict(self.text or {}), **common}, {**dict(self.vision or {}), **common}

    def setup(self):
        text, vision = self.tower_kwargs()
        self.text_model = CLIPTextModel(**text)
        self.vision_model = CLIPVisionModel(**vision)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()), ()
        )

    def encode_text(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
        """[B, L] token ids -> dict(text_embeds [B, P], last_hidden_state [B, L, W], pooled_output)."""
        return self.text_model(input_ids, attention_mask)

    def encode_image(self, pixel_values: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """[B, H, W, 3] normalised images -> dict(image_embeds [B, P], last_hidden_state, pooled_output)."""
        return self.vision_model(pixel_values)

    def __call__(
        self, input_ids: jnp.ndarray, pixel_values: jnp.ndarray, deterministic: bool = True
    ) -> dict[str, jnp.ndarray]:
        """Both towers; returns text_embeds, image_embeds, last_hidden_state and logit_scale (a log)."""
        t = self.encode_text(input_ids)
        v = self.encode_image(pixel_values)
        return dict(
            text_embeds=t["text_embeds"],
            image_embeds=v["image_embeds"],
            last_hidden_state=t["last_hidden_state"],
            logit_scale=self.logit_scale,
        )


def build(variant: str, **overrides: Any) -> CLIP:
    """Builds the two-tower :class:`CLIP` of :data:`VARIANTS` (overrides apply to the CLIP fields)."""
    if variant not in VARIANTS:
        raise ValueError(f"clip variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return CLIP(**{**VARIANTS[variant], **overrides})


def build_text(variant: str, **overrides: Any) -> CLIPTextModel:
    """Builds the text tower of a variant on its own (``text_encoder`` component)."""
    if variant not in VARIANTS:
        raise ValueError(f"clip variant {variant!r}: expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    return CLIPTextModel(**{**v["text"], "projection_dim": v["projection_dim"], **overrides})


def build_vision(variant: str, **overrides: Any) -> CLIPVisionModel:
    """Builds the vision tower of a variant on its own (``image_encoder`` component)."""
    if variant not in VARIANTS:
        raise ValueError(f"clip variant {variant!r}: expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    return CLIPVisionModel(**{**v["vision"], "projection_dim": v["projection_dim"], **overrides})


def preprocess_images(images: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """Resize (shorter side, bicubic) + centre crop + CLIP mean/std normalisation.

    Follows transformers ``CLIPImageProcessor`` (resize shortest edge, centre crop,
    rescale 1/255, normalise) except that resizing is ``jax.image.resize`` bicubic
    with antialiasing rather than PIL's, so values differ slightly from PIL at the edges.

    Args:
      images: [B, H, W, 3] uint8 in [0, 255] or float in [0, 1].
      image_size: output side.

    Returns:
      [B, image_size, image_size, 3] float32.
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    b, h, w, c = x.shape
    s = image_size / min(h, w)
    nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
