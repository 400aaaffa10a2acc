"""The attention-free super-resolution U-Nets of unCLIP (paper section 2.1, appendix C).

:class:`SuperResUNet` is guided-diffusion's ``SuperResModel``: the noisy high-resolution image
concatenated (channels last) with the low-resolution image already upsampled to the same size
(6 channels), then the U-Net of :mod:`unclip_jax.models.unet` without attention; the output is
eps (3 channels). Numerics are those of diffusers ``UNet2DModel`` in the Karlo
super-resolution configuration (``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``
levels, ``UNetMidBlock2D`` without attention, positional timestep embedding). Being fully
convolutional it runs at any size divisible by ``2 ** (len(channel_mult) - 1)``: the paper
trains on crops of a quarter of the target size and samples at full size.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unclip_jax.models.unet import UNetModel

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


class SuperResUNet(UNetModel):
    """Attention-free ADM U-Net for super-resolution (diffusers ``UNet2DModel``, Karlo super-res family).

    guided-diffusion's ``SuperResModel``: concatenate the (already upsampled) low-resolution image
    to the noisy image, then :class:`unclip_jax.models.unet.UNetModel` without attention. Fields:
    :class:`~unclip_jax.models.unet.UNetFields`, with the super-resolution defaults below.

    Attributes:
      in_channels: 6 = noisy image + upsampled low-resolution image.
      out_channels: 3 (eps).
      use_scale_shift_norm: ``scale_shift`` time conditioning (Karlo: False = additive).
      sample_size: nominal output size (diffusers config only).
    """

    in_channels: int = 6
    out_channels: int = 3
    use_scale_shift_norm: bool = False
    sample_size: int = 256

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
        return super().__call__(x, t, deterministic=deterministic)


def build(variant: str, **overrides: Any) -> SuperResUNet:
    """Builds a :class:`SuperResUNet` from :data:`VARIANTS` with keyword overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"upsampler variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return SuperResUNet(**{**VARIANTS[variant], **overrides})
