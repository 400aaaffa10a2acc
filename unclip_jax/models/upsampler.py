"""The attention-free super-resolution U-Nets of unCLIP (paper section 2.1, appendix C).

:class:`SuperResUNet` has the numerics of diffusers ``UNet2DModel`` in the Karlo
super-resolution configuration (``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``
levels, ``UNetMidBlock2D`` without attention, positional timestep embedding): the ADM
U-Net with resblock up/down-sampling and no attention. Its input is the noisy
high-resolution image concatenated (channels last) with the low-resolution image already
upsampled to the same size (6 channels); the output is eps (3 channels). Being fully
convolutional it runs at any size divisible by ``2 ** (len(channel_mult) - 1)``: the paper
trains on crops of a quarter of the target size and samples at full size.

Configuration names are guided-diffusion's (``model_channels`` x ``channel_mult`` =
diffusers ``block_out_channels``; ``num_res_blocks`` = ``layers_per_block``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.layers.embeddings import TimestepEmbedding, timestep_embedding
from unclip_jax.layers.unet_blocks import DownBlock, MidBlock, UpBlock, constrain_spatial, conv, group_norm

Dtype = Any

VARIANTS: dict[str, dict[str, Any]] = {
    # Compiles and runs in seconds on CPU.
    "test": dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8, sample_size=32),
    # The CPU demo (unclip_jax.demo, experiments/upsampler.py:tiny): 32 -> 128, block channels (8, 16), 1 block.
    "tiny": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8, sample_size=128),
    # Benchmark size: block channels (32, 64, 96, 128), 2 blocks, no attention.
    "bench": dict(model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=2, sample_size=256),
    # kakaobrain/karlo-v1-alpha super_res_first / super_res_last (64->256), ~700M parameters.
    "karlo": dict(model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3, sample_size=256),
    # Appendix C, 64->256: 320 channels, mult 1,2,3,4, 3 res blocks (700M), dropout 0.1, ADM scale-shift norm.
    "paper": dict(
        model_channels=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        use_scale_shift_norm=True,
        dropout=0.1,
        sample_size=256,
    ),
    # Appendix C, 256->1024: 192 channels, mult 1,1,2,2,4,4, 2 res blocks (300M), ADM scale-shift norm.
    "paper_1024": dict(
        model_channels=192,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        use_scale_shift_norm=True,
        sample_size=1024,
    ),
}


class SuperResUNet(nn.Module):
    """Attention-free ADM U-Net for super-resolution (diffusers ``UNet2DModel``, Karlo super-res family).

    Attributes:
      in_channels: 6 = noisy image + upsampled low-resolution image.
      out_channels: 3 (eps).
      model_channels: width of the first level (diffusers ``block_out_channels[0]``).
      channel_mult: width multipliers per level.
      num_res_blocks: residual blocks per encoder level (decoder levels get one more).
      use_scale_shift_norm: ``scale_shift`` time conditioning (Karlo: False = additive).
      time_embed_dim: timestep embedding width (default ``4 * model_channels``).
      norm_num_groups, norm_eps: GroupNorm settings.
      flip_sin_to_cos, freq_shift: sinusoidal timestep features.
      dropout: dropout inside the residual blocks.
      sample_size: nominal output size (diffusers config only).
      remat: rematerialise the residual blocks.
    """

    in_channels: int = 6
    out_channels: int = 3
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    use_scale_shift_norm: bool = False
    time_embed_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dropout: float = 0.0
    sample_size: int = 256
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.model_channels

    @property
    def downsampling_factor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    @nn.compact
    def __call__(
        self,
        x_t: jnp.ndarray,
        t: jnp.ndarray,
        low_res: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Predicts eps for a noisy high-resolution image.

        Args:
          x_t: [B, H, W, C] noisy image; with ``low_res`` None it must already hold all
            ``in_channels`` (noisy image and upsampled conditioning, in that order).
          t: [B] timesteps.
          low_res: optional [B, H, W, in_channels - C] low-resolution image already
            upsampled to H x W; concatenated after ``x_t``.
          deterministic: disables dropout.

        Returns:
          [B, H, W, out_channels] in the compute dtype.
        """
        x = x_t if low_res is None else jnp.concatenate([x_t, low_res.astype(x_t.dtype)], axis=-1)
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"SuperResUNet: input {x.shape} must be [B, H, W, {self.in_channels}] with H, W multiples of {f}"
            )
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        t_feat = timestep_embedding(t, self.model_channels, self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(self.temb_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="time_embedding")(
            t_feat.astype(self.dtype)
        )
        common = dict(
            time_embedding_norm="scale_shift" if self.use_scale_shift_norm else "default",
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            dropout=self.dropout,
            remat=self.remat,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        chans = self.block_out_channels
        levels = len(chans)
        h = constrain_spatial(conv(chans[0], self.dtype, self.param_dtype, "conv_in")(x.astype(self.dtype)))
        skips = [h]
        for i in range(levels):
            h, s = DownBlock(
                out_channels=chans[i],
                num_layers=self.num_res_blocks,
                add_downsample=i < levels - 1,
                name=f"down_blocks_{i}",
                **common,
            )(h, temb, deterministic=deterministic)
            skips += s
        h = MidBlock(out_channels=chans[-1], name="mid_block", **common)(h, temb, deterministic=deterministic)
        for i in range(levels):
            level = levels - 1 - i
            n = self.num_res_blocks + 1
            res, skips = skips[-n:], skips[:-n]
            h = UpBlock(
                out_channels=chans[level],
                num_layers=n,
                add_upsample=level > 0,
                name=f"up_blocks_{i}",
                **common,
            )(h, res, temb, deterministic=deterministic)
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, self.param_dtype, "conv_norm_out")(h))
        return conv(self.out_channels, self.dtype, self.param_dtype, "conv_out", zero_init=True)(h)


def build(variant: str, **overrides: Any) -> SuperResUNet:
    """Builds a :class:`SuperResUNet` from :data:`VARIANTS` with keyword overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"upsampler variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return SuperResUNet(**{**VARIANTS[variant], **overrides})
