"""The ADM U-Net of unCLIP's decoder and upsamplers (guided-diffusion ``UNetModel``), NHWC.

One network, the U-Net of guided-diffusion's ``unet.py`` (Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs", section 3) with ``resblock_updown``: ``conv_in``; per level ``num_res_blocks`` residual
blocks (each followed by attention where the level attends) and a down-sampling residual block
between levels; a middle of residual block, attention, residual block; decoder levels mirroring
the encoder with ``num_res_blocks + 1`` blocks that each consume a skip activation; GroupNorm,
SiLU and a zero-initialised ``conv_out``. The timestep embedding (sinusoidal features and an MLP)
conditions every residual block; an optional ``class_labels`` embedding is added to it.

Attention is optional. With it, every attention block is GLIDE's ``AttentionBlock`` with
``encoder_channels`` (Nichol et al. 2021): the context supplies extra keys and values
(:class:`unclip_jax.layers.unet_blocks.AddedKVAttention`) and the middle block always attends.
Without it the network is attention-free throughout.

The configuration is written once: :class:`UNetFields` (every U-Net) and :class:`AttentionUNetFields`
(adds where and how wide the attention is). The cascade's networks are this U-Net:

- :class:`unclip_jax.models.decoder.Decoder` = :class:`AttentionUNetFields` + :class:`UNetModel`
  (diffusers ``UNet2DConditionModel`` numerics, ``class_embed_type="identity"``);
- :class:`unclip_jax.models.upsampler.SuperResUNet` = :class:`UNetModel` that first concatenates the
  upsampled low-resolution image (guided-diffusion ``SuperResModel``; diffusers ``UNet2DModel``
  numerics).

Module and parameter names mirror diffusers' (``conv_in``, ``time_embedding``,
``down_blocks_{i}``, ``mid_block``, ``up_blocks_{i}``, ``conv_norm_out``, ``conv_out``), so loading
diffusers weights is a renaming. Configuration names are guided-diffusion's: ``model_channels`` x
``channel_mult`` give diffusers' ``block_out_channels``; ``num_res_blocks`` is ``layers_per_block``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers.embeddings import TimestepEmbedding, timestep_embedding
from unclip_jax.layers.unet_blocks import DownBlock, MidBlock, UpBlock, constrain_spatial, conv, group_norm

Dtype = Any


class UNetFields(nn.Module):
    """The configuration of every U-Net of the cascade (guided-diffusion ``UNetModel`` arguments).

    A field-only base: :class:`UNetModel` is the network; other modules (the decoder with its
    text projection) inherit these fields to build one.

    Attributes:
      in_channels: input channels (3 for an image; 6 for an image and its upsampled low-res version).
      out_channels: output channels (6 = eps and the learned-range variance interpolation v of
        improved DDPM; 3 = eps).
      model_channels: width of the first level (diffusers ``block_out_channels[0]``).
      channel_mult: width multipliers per level (``block_out_channels = model_channels * mult``).
      num_res_blocks: residual blocks per encoder level (decoder levels get one more).
      use_scale_shift_norm: ``scale_shift`` (True, ADM adaptive group norm) or additive (False)
        time conditioning (diffusers ``resnet_time_scale_shift``).
      time_embed_dim: timestep embedding width (default ``4 * model_channels``).
      norm_num_groups, norm_eps: GroupNorm of the residual blocks and the output norm.
      flip_sin_to_cos, freq_shift: sinusoidal timestep features (diffusers ``Timesteps``).
      dropout: dropout inside the residual blocks.
      sample_size: nominal image size (diffusers config; any multiple of
        :attr:`downsampling_factor` runs).
      remat: rematerialise residual and attention blocks.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    in_channels: int = 3
    out_channels: int = 6
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    use_scale_shift_norm: bool = True
    time_embed_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    sample_size: int = 64
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def fields_of(cls, module: UNetFields) -> dict[str, Any]:
        """``module``'s values of the constructor fields ``cls`` declares (``cls`` is one of its bases).

        E.g. ``AttentionUNetFields.fields_of(unclip_decoder)`` are the kwargs of its inner U-Net.
        """
        return {
            f.name: getattr(module, f.name)
            for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name")
        }

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Width of each level (diffusers ``block_out_channels``)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def temb_dim(self) -> int:
        """Width of the timestep embedding."""
        return self.time_embed_dim or 4 * self.model_channels

    @property
    def downsampling_factor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_head_dim(self) -> int | None:
        """Channels per attention head; None: no attention anywhere (the middle block included)."""
        return None

    def level_attends(self, level: int) -> bool:
        """Whether encoder level ``level`` (and its mirror decoder level) has attention."""
        return False


class AttentionUNetFields(UNetFields):
    """The configuration of a U-Net with GLIDE attention over the image and a context (``UNetFields`` plus three).

    Attributes:
      attention_resolutions: downsampling factors (1 = the input resolution, 2 = the first
        downsampled level, ...) of the levels that attend; the middle block always attends
        (guided-diffusion ``attention_ds``; the paper's "32,16,8" at 64x64 is (2, 4, 8)).
      num_head_channels: channels per attention head (diffusers ``attention_head_dim``).
      context_dim: width of the attention context (diffusers ``cross_attention_dim``; GLIDE
        ``encoder_channels``).
    """

    attention_resolutions: Sequence[int] = (2, 4, 8)
    num_head_channels: int = 64
    context_dim: int = 1536

    @property
    def attention_head_dim(self) -> int | None:
        """Channels per attention head."""
        return self.num_head_channels

    def level_attends(self, level: int) -> bool:
        """Whether encoder level ``level`` (and its mirror decoder level) has attention."""
        return 2**level in tuple(self.attention_resolutions)


class UNetModel(UNetFields):
    """The ADM U-Net (guided-diffusion ``UNetModel``); attention where its fields say (see module docstring)."""

    @nn.compact
    def __call__(
        self,
        x_t: jnp.ndarray,
        t: jnp.ndarray,
        context: jnp.ndarray | None = None,
        class_labels: jnp.ndarray | None = None,
        context_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Predicts the noise (and the variance interpolation) for a noisy image.

        Args:
          x_t: [B, H, W, in_channels] noisy images; H, W multiples of :attr:`downsampling_factor`.
          t: [B] timesteps (integer or float).
          context: [B, S, context_dim] attention context; needed when the U-Net attends
            (unCLIP decoder: 4 CLIP tokens + caption states).
          class_labels: optional [B, temb_dim] added to the timestep embedding (diffusers
            ``class_embed_type="identity"``; the decoder's CLIP-derived additive embedding).
          context_mask: optional [B, S] bool, True = real token.
          deterministic: disables dropout.

        Returns:
          [B, H, W, out_channels] in the compute dtype.
        """
        f = self.downsampling_factor
        if x_t.ndim != 4 or x_t.shape[-1] != self.in_channels or x_t.shape[1] % f or x_t.shape[2] % f:
            raise ValueError(
                f"{type(self).__name__}: input {x_t.shape} must be [B, H, W, {self.in_channels}] "
                f"with H, W multiples of {f}"
            )
        t = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
        t_feat = timestep_embedding(t, self.model_channels, self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.temb_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="time_embedding")(
            t_feat.astype(self.dtype)
        )
        if class_labels is not None:
            temb = temb + class_labels.astype(temb.dtype)
        if context is not None:
            context = context.astype(self.dtype)
        head_dim = self.attention_head_dim
        common = dict(
            time_embedding_norm="scale_shift" if self.use_scale_shift_norm else "default",
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            dropout=self.dropout,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if head_dim is not None:
            common["head_dim"] = head_dim
        chans = self.block_out_channels
        levels = len(chans)
        h = constrain_spatial(conv(chans[0], self.dtype, self.param_dtype, "conv_in")(x_t.astype(self.dtype)))
        skips = [h]
        for i in range(levels):
            h, s = DownBlock(
                out_channels=chans[i],
                num_layers=self.num_res_blocks,
                attention=self.level_attends(i),
                add_downsample=i < levels - 1,
                name=f"down_blocks_{i}",
                **common,
            )(h, temb, context, context_mask, deterministic)
            skips += s
        h = MidBlock(out_channels=chans[-1], attention=head_dim is not None, name="mid_block", **common)(
            h, temb, context, context_mask, deterministic
        )
        for i in range(levels):
            level = levels - 1 - i
            n = self.num_res_blocks + 1
            res, skips = skips[-n:], skips[:-n]
            h = UpBlock(
                out_channels=chans[level],
                num_layers=n,
                attention=self.level_attends(level),
                add_upsample=level > 0,
                name=f"up_blocks_{i}",
                **common,
            )(h, res, temb, context, context_mask, deterministic)
        h = group_norm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, "conv_norm_out", silu=True)(h)
        return conv(self.out_channels, self.dtype, self.param_dtype, "conv_out", zero_init=True)(h)
