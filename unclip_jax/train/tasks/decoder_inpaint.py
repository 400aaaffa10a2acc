"""GLIDE's inpainting fine-tune of the decoder (Nichol et al. 2021, GLIDE section 4.3 / ``InpaintText2ImUNet``).

The decoder gets four extra input channels, the masked image ``image * mask`` and the mask (1 = known pixel), and is
trained with the decoder's loss (:class:`unclip_jax.train.tasks.decoder.DecoderTask`: hybrid loss, the same
classifier-free-guidance dropouts) while a random region of every training image is erased: per example a
rectangle or free-form brush strokes (:func:`random_inpaint_masks`, the masks of Yu et al. 2019, "Free-Form Image
Inpainting with Gated Convolution"), drawn inside the jitted step from the step's key. The loss covers every pixel, as
GLIDE's does.

Fine-tuning from a trained decoder: :func:`unclip_jax.convert.decoder.widen_for_inpainting` writes the decoder with its
input convolution widened by zero weights for the new channels (the same function at the start) as a native folder
for ``--config.init_from``; ``experiments/decoder_inpaint.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unclip_jax.models import decoder as decoder_lib
from unclip_jax.train.tasks import base
from unclip_jax.train.tasks.decoder import DecoderTask

STROKE_PROB = 0.5  # fraction of free-form stroke masks (the rest rectangles)
STROKE_VERTICES = 5


def _rectangle(key: jax.Array, size: int) -> jax.Array:
    """One rectangle hole with sides in [size/4, 3 size/4], anywhere in the image: [S, S] with 0 in the hole."""
    k_h, k_w, k_y, k_x = jax.random.split(key, 4)
    lo, hi = max(1, size // 4), max(2, (3 * size) // 4 + 1)
    h = jax.random.randint(k_h, (), lo, hi)
    w = jax.random.randint(k_w, (), lo, hi)
    y0 = jax.random.randint(k_y, (), 0, size - h + 1)
    x0 = jax.random.randint(k_x, (), 0, size - w + 1)
    ys, xs = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
    hole = (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)
    return 1.0 - hole.astype(jnp.float32)


def _strokes(key: jax.Array, size: int) -> jax.Array:
    """A free-form brush stroke: a random walk of :data:`STROKE_VERTICES` vertices (steps of size/8 .. size/3 at
    uniform angles, kept inside the image) drawn with a round brush of radius size/16 .. size/8: [S, S], 0 in it."""
    k_start, k_angle, k_len, k_r = jax.random.split(key, 4)
    n = STROKE_VERTICES
    start = jax.random.uniform(k_start, (2,), minval=0.0, maxval=size - 1.0)
    angles = jax.random.uniform(k_angle, (n - 1,), minval=0.0, maxval=2 * jnp.pi)
    lengths = jax.random.uniform(k_len, (n - 1,), minval=size / 8, maxval=size / 3)
    steps = jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1) * lengths[:, None]

    def walk(p, step):
        q = jnp.clip(p + step, 0.0, size - 1.0)
        return q, q

    _, rest = jax.lax.scan(walk, start, steps)
    pts = jnp.concatenate([start[None], rest], 0)  # [n, 2] (y, x)
    radius = jax.random.uniform(k_r, (), minval=max(1.0, size / 16), maxval=max(1.5, size / 8))
    yx = jnp.stack(jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij"), -1).astype(jnp.float32)
    a, b = pts[:-1], pts[1:]  # segments [n-1, 2]
    ab = b - a
    ap = yx[:, :, None, :] - a  # [S, S, n-1, 2]
    u = jnp.clip(jnp.sum(ap * ab, -1) / jnp.maximum(jnp.sum(ab * ab, -1), 1e-6), 0.0, 1.0)
    dist = jnp.linalg.norm(ap - u[..., None] * ab, axis=-1).min(-1)
    return 1.0 - (dist <= radius).astype(jnp.float32)


def random_inpaint_masks(key: jax.Array, batch: int, size: int, stroke_prob: float = STROKE_PROB) -> jax.Array:
    """Random training masks ``[B, S, S, 1]`` float32, 1 = known pixel, 0 = erased: per example free-form strokes
    with probability ``stroke_prob``, else a rectangle. Every mask erases at least one pixel."""
    keys = jax.random.split(key, 3 * batch).reshape(batch, 3, -1)
    rect = jax.vmap(lambda k: _rectangle(k, size))(keys[:, 0])
    strokes = jax.vmap(lambda k: _strokes(k, size))(keys[:, 1])
    use_strokes = jax.vmap(lambda k: jax.random.bernoulli(k, stroke_prob))(keys[:, 2])
    return jnp.where(use_strokes[:, None, None], strokes, rect)[..., None]


def centre_mask(batch: int, size: int) -> jax.Array:
    """The previews' mask: the central half of the image erased. ``[B, S, S, 1]``."""
    m = jnp.ones((size, size), jnp.float32).at[size // 4 : size - size // 4, size // 4 : size - size // 4].set(0.0)
    return jnp.broadcast_to(m[None, :, :, None], (batch, size, size, 1))


class DecoderInpaintTask(DecoderTask):
    """:class:`~unclip_jax.train.tasks.decoder.DecoderTask` of a decoder with ``in_channels = 7`` and random masks."""

    name = "decoder_inpaint"

    def __init__(self, module: decoder_lib.UnCLIPDecoder, diffusion_config: Any, **kwargs: Any):
        if module.in_channels != 3 + decoder_lib.INPAINT_CHANNELS:
            raise ValueError(
                f"decoder_inpaint: the decoder has in_channels={module.in_channels}; GLIDE's inpainting decoder has "
                f"{3 + decoder_lib.INPAINT_CHANNELS} (x_t, masked image, mask)"
            )
        super().__init__(module, diffusion_config, **kwargs)

    def draws(self, rng: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
        """The decoder's draws plus ``inpaint_mask`` [B, S, S, 1] (:func:`random_inpaint_masks`)."""
        k_base, k_mask = jax.random.split(rng)
        out = super().draws(k_base, batch)
        b, s = batch["image"].shape[:2]
        out["inpaint_mask"] = random_inpaint_masks(k_mask, b, s)
        return out

    def extra_inputs(self, batch: base.Batch, draws: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        """The source image and the step's mask (the previews' and init's: :func:`centre_mask`)."""
        image = base.to_model_range(batch["image"])
        mask = draws["inpaint_mask"] if draws is not None else centre_mask(image.shape[0], image.shape[1])
        return dict(inpaint_image=image, inpaint_mask=mask)


def make_decoder_inpaint_task(config: Any) -> DecoderInpaintTask:
    """The task of ``experiments/decoder_inpaint.py``: the decoder variant with ``in_channels`` 7 (the widened input
    convolution), ``config.diffusion`` and the decoder's classifier-free-guidance dropouts."""
    kwargs = {
        "in_channels": 3 + decoder_lib.INPAINT_CHANNELS,
        **base.model_kwargs(config.model, config.data.image_size),
    }
    return DecoderInpaintTask(
        decoder_lib.build(config.model.variant, **kwargs),
        config.diffusion,
        drop_image_prob=config.task.drop_image_prob,
        drop_caption_prob=config.task.drop_caption_prob,
        null_caption=base.null_caption(config),
    )
