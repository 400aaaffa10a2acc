"""CLIP score: cosine similarity between CLIP embeddings of generated images and their captions.

Two conventions are in use and both are reported:

- raw mean cosine similarity, as Karlo reports it (0.319 on MS-COCO 30k);
- ``100 * max(cos, 0)`` averaged over pairs: "CLIPScore" of Hessel et al. 2021 (eq. 1
  with w = 100, the scale used by torchmetrics and most text-to-image papers). Hessel et
  al.'s reference-free metric uses w = 2.5; ``hessel_w`` changes it.

The numbers depend on the CLIP model (ViT-L/14 vs ViT-H/14, ...), so every report names
it. Functions take arrays or embedding functions; :func:`clip_embed_fns` adapts an
``unclip_jax.models.clip.CLIP`` (imported lazily).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


def cosine_similarity(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64: ``[N, D], [N, D] -> [N]``."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine_similarity: image embeds {a.shape} and text embeds {b.shape} must both be [N, D]")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@dataclasses.dataclass(frozen=True)
class ClipScoreStats:
    """Mergeable running sums of per-pair cosine similarities (for sharded / resumed evaluation)."""

    n: int = 0
    sum_cos: float = 0.0
    sum_cos_sq: float = 0.0
    sum_clipped: float = 0.0  # sum of max(cos, 0)

    def update(self, cos: np.ndarray) -> ClipScoreStats:
        """Adds per-pair cosine similarities ``[N]``."""
        c = np.asarray(cos, np.float64).ravel()
        return ClipScoreStats(
            self.n + c.size,
            self.sum_cos + float(c.sum()),
            self.sum_cos_sq + float((c * c).sum()),
            self.sum_clipped + float(np.maximum(c, 0.0).sum()),
        )

    def merge(self, other: ClipScoreStats) -> ClipScoreStats:
        """Statistics of the union of both sets."""
        return ClipScoreStats(
            self.n + other.n,
            self.sum_cos + other.sum_cos,
            self.sum_cos_sq + other.sum_cos_sq,
            self.sum_clipped + other.sum_clipped,
        )

    def report(self, model_name: str, hessel_w: float = 100.0) -> dict[str, Any]:
        """``{"clip_model", "num_pairs", "clip_score_raw", "clip_score_raw_std", "clip_score_hessel", "hessel_w"}``."""
        if self.n == 0:
            raise ValueError("ClipScoreStats.report: no pairs accumulated")
        mean = self.sum_cos / self.n
        var = max(self.sum_cos_sq / self.n - mean * mean, 0.0)
        return {
            "clip_model": model_name,
            "num_pairs": self.n,
            "clip_score_raw": mean,
            "clip_score_raw_std": float(np.sqrt(var)),
            "clip_score_hessel": hessel_w * self.sum_clipped / self.n,
            "hessel_w": hessel_w,
        }


def clip_score(
    image_embeds: np.ndarray, text_embeds: np.ndarray, model_name: str, hessel_w: float = 100.0
) -> dict[str, Any]:
    """CLIP score of matched (image, caption) embedding pairs ``[N, D]``; see :meth:`ClipScoreStats.report`."""
    return ClipScoreStats().update(cosine_similarity(image_embeds, text_embeds)).report(model_name, hessel_w)


def clip_score_from_fns(
    embed_images: Callable[[Any], np.ndarray],
    embed_texts: Callable[[Any], np.ndarray],
    batches,
    model_name: str,
    hessel_w: float = 100.0,
) -> dict[str, Any]:
    """CLIP score over an iterable of ``(images, captions)`` batches using embedding functions.

    Args:
      embed_images: images batch -> ``[B, D]`` image embeddings.
      embed_texts: caption batch (token ids or strings, whatever the function takes) -> ``[B, D]``.
      batches: iterable of ``(images, captions)``.
      model_name: CLIP model identity for the report.
      hessel_w: Hessel scale.
    """
    stats = ClipScoreStats()
    for images, captions in batches:
        stats = stats.update(cosine_similarity(np.asarray(embed_images(images)), np.asarray(embed_texts(captions))))
    return stats.report(model_name, hessel_w)


def clip_embed_fns(model: Any, variables: Any, image_size: int | None = None) -> tuple[Callable, Callable]:
    """Jitted embedding functions of an ``unclip_jax.models.clip.CLIP``.

    Args:
      model: the CLIP module (``encode_image(pixel_values)`` / ``encode_text(input_ids)``
        returning dicts with ``image_embeds`` / ``text_embeds``).
      variables: its variables.
      image_size: if given, raw images ``[B, H, W, 3]`` in [0, 1] are resized and
        normalised with ``unclip_jax.models.clip.preprocess_images`` first; otherwise the
        image function expects CLIP-normalised pixels.

    Returns:
      ``(embed_images, embed_texts)``, each returning numpy ``[B, D]``.
    """
    import jax

    def img(pixels):
        if image_size is not None:
            from unclip_jax.models.clip import preprocess_images

            pixels = preprocess_images(pixels, image_size)
        return model.apply(variables, pixels, method="encode_image")["image_embeds"]

    def txt(input_ids):
        return model.apply(variables, input_ids, method="encode_text")["text_embeds"]

    img_j, txt_j = jax.jit(img), jax.jit(txt)
    return (lambda x: np.asarray(img_j(x))), (lambda t: np.asarray(txt_j(t)))
