"""The cascade's array operations outside the networks: CLIP encoding, the super-resolution resize, slerp.

- :func:`encode_text` / :func:`encode_image`: the CLIP towers as diffusers' ``UnCLIPPipeline`` calls them.
- :func:`resize`: bicubic antialiased resize, the upsamplers' conditioning (``F.interpolate(..., 'bicubic',
  antialias=True)``, equal to ``jax.image.resize`` to ~1e-6).
- :func:`slerp`: spherical interpolation of directions with linearly interpolated norms (paper section 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.models.clip import CLIP, CLIPVisionModel, preprocess_images


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
