"""Image manipulations with the bipartite latent (z_i, x_T) (paper section 3, figures 3-7).

- **Variations** (3.1): z_i = CLIP(image); x_T = DDIM inversion of the image with the decoder conditioned on z_i;
  decode (z_i, x_T) with DDIM and eta > 0 (eta = 0 reconstructs the image).
- **Interpolations** (3.2): z_theta = slerp(z_i1, z_i2, theta); x_T either slerp(x_T1, x_T2, theta) (a trajectory
  whose endpoints reconstruct both images) or one random x_T held fixed for all theta.
- **Text diffs** (3.3): z_d = normalize(z_t - z_t0) for a target caption z_t and a caption of the current image
  z_t0; decode slerp(z_i, z_d, theta) for theta in [0, ~0.5] with x_T fixed to the image's inversion.
- **PCA probing** (3.4 / figure 7): decode reconstructions of z_i from its first k principal components (numpy PCA
  fitted on a set of embeddings).

All decoding goes through `UnclipPipeline.decode` / `invert` (compiled once per shape and setting). ``slerp``
interpolates directions spherically and norms linearly (`unclip_jax.pipeline.ops.slerp`); the text-diff direction is rescaled to
``|z_i|`` so that the edit only rotates z_i (CLIP embeddings of open models are not unit-norm).

Decoding from an inverted x_T disables the decoder's x0 clipping when eta = 0 (so eta = 0 is the exact inverse of
the inversion, up to its discretisation error) and keeps it otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.pipeline.cascade import UnclipPipeline
from unclip_jax.pipeline.ops import resize, slerp
from unclip_jax.pipeline.settings import StageSettings

# Decoder default for the manipulations: DDIM 50 steps, no guidance (inversion with guidance is unstable).
MANIPULATION_DECODER = StageSettings(50, "ddim", eta=0.0, guidance_scale=None)


def _settings(settings: Mapping[str, StageSettings | None] | None, eta: float) -> dict[str, StageSettings | None]:
    s = dict(settings or {})
    dec = s.get("decoder") or MANIPULATION_DECODER
    s["decoder"] = dataclasses.replace(dec, sampler="ddim", eta=float(eta))
    return s


def _decode(
    pipe: UnclipPipeline,
    image_embeds: np.ndarray,
    *,
    eta: float,
    settings: Mapping[str, StageSettings | None] | None,
    **kw: Any,
) -> dict[str, np.ndarray]:
    """`UnclipPipeline.decode` with DDIM ``eta`` on the decoder; x0 clipping off at eta 0 (the exact inverse of the
    inversion), the decoder's own otherwise."""
    clip = None if eta == 0 else "default"
    return pipe.decode(image_embeds, settings=_settings(settings, eta), decoder_clip_denoised=clip, **kw)


def prepare_images(pipe: UnclipPipeline, images: np.ndarray) -> np.ndarray:
    """``[B, H, W, 3]`` in [-1, 1] -> the decoder's resolution (bicubic, antialiased)."""
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[None]
    size = pipe.decoder_size
    if images.shape[1:3] == (size, size):
        return images
    return np.asarray(resize(jnp.asarray(images), size))


def bipartite_latent(
    pipe: UnclipPipeline,
    images: np.ndarray,
    *,
    captions: Sequence[str] | None = None,
    settings: Mapping[str, StageSettings | None] | None = None,
) -> dict[str, np.ndarray]:
    """(z_i, x_T) of images (section 3): CLIP image embedding and DDIM inversion with the decoder.

    Args:
        images: ``[B, H, W, 3]`` (or one ``[H, W, 3]``) in [-1, 1]; resized to the decoder's resolution.

    Returns:
        dict(image_embeds [B, D], x_T [B, s, s, 3], x_start [B, s, s, 3]).
    """
    x = prepare_images(pipe, images)
    z = pipe.encode_images(images if np.ndim(images) == 4 else np.asarray(images)[None])
    x_T = pipe.invert(x, z, captions=captions, settings=_settings(settings, 0.0))
    return dict(image_embeds=z, x_T=x_T, x_start=x)


def variations(
    pipe: UnclipPipeline,
    image: np.ndarray,
    *,
    num: int = 4,
    eta: float = 1.0,
    seed: int = 0,
    caption: str = "",
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str | None = None,
    latent: Mapping[str, np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Variations of one image (section 3.1, figure 3): decode (z_i, x_T) ``num`` times with DDIM eta.

    Args:
        image: ``[H, W, 3]`` in [-1, 1].
        num: how many variations.
        eta: DDIM eta (> 0 for variations; 0 reconstructs the image every time).
        caption: caption conditioning of the decoder ("" = image only).
        latent: a precomputed `bipartite_latent` of the image.

    Returns:
        dict(images [num, ...], decoder_images [num, s, s, 3], labels, image_embeds, x_T).
    """
    lat = dict(latent) if latent is not None else bipartite_latent(pipe, image, captions=[caption], settings=settings)
    z = np.repeat(lat["image_embeds"][:1], num, axis=0)
    x_T = np.repeat(lat["x_T"][:1], num, axis=0)
    out = _decode(
        pipe,
        z,
        captions=[caption] * num,
        x_T=x_T,
        seed=seed,
        stop_after=stop_after,
        progress=progress,
        eta=eta,
        settings=settings,
    )
    return dict(out, labels=[f"eta={eta:g} #{i}" for i in range(num)], x_T=lat["x_T"], x_start=lat["x_start"])


def interpolate(
    pipe: UnclipPipeline,
    image_a: np.ndarray,
    image_b: np.ndarray,
    *,
    num: int = 5,
    x_T_mode: Literal["slerp", "fixed"] = "slerp",
    eta: float = 0.0,
    seed: int = 0,
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Interpolation between two images (section 3.2, figure 4).

    Args:
        image_a, image_b: ``[H, W, 3]`` in [-1, 1] (same size).
        num: number of thetas in [0, 1] (endpoints included).
        x_T_mode: ``"slerp"``: x_T = slerp(x_T(a), x_T(b), theta) (the endpoints reconstruct the inputs);
            ``"fixed"``: one random x_T (from ``seed``) for every theta.
        eta: DDIM eta of decoding.

    Returns:
        dict(images, decoder_images, labels, thetas, image_embeds (the interpolated z), x_T (used)).
    """
    if x_T_mode not in ("slerp", "fixed"):
        raise ValueError(f"interpolate: x_T_mode={x_T_mode!r}; expected 'slerp' or 'fixed'")
    lat = bipartite_latent(pipe, np.stack([image_a, image_b]), settings=settings)
    thetas = np.linspace(0.0, 1.0, num, dtype=np.float32)
    za = np.repeat(lat["image_embeds"][:1], num, 0)
    zb = np.repeat(lat["image_embeds"][1:2], num, 0)
    z = np.asarray(slerp(jnp.asarray(za), jnp.asarray(zb), jnp.asarray(thetas)))
    if x_T_mode == "slerp":
        xa = np.repeat(lat["x_T"][:1], num, 0)
        xb = np.repeat(lat["x_T"][1:2], num, 0)
        x_T = np.asarray(slerp(jnp.asarray(xa), jnp.asarray(xb), jnp.asarray(thetas)))
    else:
        one = jax.random.normal(jax.random.PRNGKey(seed), lat["x_T"].shape[1:], jnp.float32)
        x_T = np.repeat(np.asarray(one)[None], num, 0)
    out = _decode(
        pipe,
        z,
        x_T=x_T,
        seed=seed,
        stop_after=stop_after,
        progress=progress,
        eta=eta,
        settings=settings,
    )
    return dict(
        out, labels=[f"theta={t:.2f}" for t in thetas], thetas=thetas, image_embeds=z, x_T=x_T, x_start=lat["x_start"]
    )


def text_diff_direction(pipe: UnclipPipeline, source: str, target: str) -> np.ndarray:
    """z_d = normalize(z_t(target) - z_t(source)) (section 3.3), ``[D]``."""
    z = pipe.encode_texts([target, source])["text_embeds"].astype(np.float64)
    d = z[0] - z[1]
    n = np.linalg.norm(d)
    if n == 0:
        raise ValueError(f"text diff: {source!r} and {target!r} have the same CLIP text embedding")
    return (d / n).astype(np.float32)


def text_diff(
    pipe: UnclipPipeline,
    image: np.ndarray,
    source: str,
    target: str,
    *,
    thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    eta: float = 0.0,
    seed: int = 0,
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Text diffs (section 3.3, figure 5): decode slerp(z_i, z_d, theta) with x_T fixed to the image's inversion.

    Args:
        image: ``[H, W, 3]`` in [-1, 1].
        source: caption of the current image (or e.g. "a photo").
        target: caption describing the desired edit.
        thetas: rotation amounts (0 reconstructs the image).

    Returns:
        dict(images, decoder_images, labels, thetas, image_embeds, direction).
    """
    lat = bipartite_latent(pipe, image, settings=settings)
    z_i = lat["image_embeds"][:1]
    d = text_diff_direction(pipe, source, target)[None]
    d = d * np.linalg.norm(z_i, axis=-1, keepdims=True)  # rotate z_i only; keep its norm
    th = np.asarray(thetas, np.float32)
    n = th.shape[0]
    z = np.asarray(slerp(jnp.asarray(np.repeat(z_i, n, 0)), jnp.asarray(np.repeat(d, n, 0)), jnp.asarray(th)))
    out = _decode(
        pipe,
        z,
        x_T=np.repeat(lat["x_T"][:1], n, 0),
        seed=seed,
        stop_after=stop_after,
        progress=progress,
        eta=eta,
        settings=settings,
    )
    return dict(out, labels=[f"theta={t:.2f}" for t in th], thetas=th, image_embeds=z, direction=d[0])


@dataclasses.dataclass(frozen=True)
class PCA:
    """A PCA of CLIP embeddings (numpy): ``mean [D]``, ``components [K, D]`` (rows, by decreasing variance),
    ``explained_variance [K]``."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def reconstruct(self, z: np.ndarray, k: int) -> np.ndarray:
        """z ``[B, D]`` projected on the first ``k`` components: ``mean + sum_j<k ((z - mean) . v_j) v_j``."""
        if not 0 <= k <= self.components.shape[0]:
            raise ValueError(f"PCA.reconstruct: k={k} outside [0, {self.components.shape[0]}]")
        v = self.components[:k].astype(np.float64)
        c = (np.asarray(z, np.float64) - self.mean) @ v.T
        return (self.mean + c @ v).astype(np.float32)


def fit_pca(embeddings: np.ndarray, num_components: int | None = None) -> PCA:
    """PCA of ``[N, D]`` embeddings by SVD of the centred data (the AR prior's codec in section 2.2 uses the same)."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_pca: need [N >= 2, D] embeddings, got {x.shape}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = num_components or vt.shape[0]
    return PCA(mean, vt[:k], (s[:k] ** 2) / (x.shape[0] - 1))


def pca_probe(
    pipe: UnclipPipeline,
    image: np.ndarray,
    pca: PCA,
    ks: Sequence[int],
    *,
    seed: int = 0,
    settings: Mapping[str, StageSettings | None] | None = None,
    stop_after: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Decodes PCA reconstructions of z_i from the first k components for each k (section 3.4, figure 7), with
    x_T fixed to the image's DDIM inversion and eta = 0.

    Returns:
        dict(images, decoder_images, labels, ks, image_embeds (the reconstructions)).
    """
    lat = bipartite_latent(pipe, image, settings=settings)
    z = np.concatenate([pca.reconstruct(lat["image_embeds"][:1], int(k)) for k in ks])
    n = len(ks)
    out = _decode(
        pipe,
        z,
        x_T=np.repeat(lat["x_T"][:1], n, 0),
        seed=seed,
        stop_after=stop_after,
        progress=progress,
        eta=0.0,
        settings=settings,
    )
    return dict(out, labels=[f"k={k}" for k in ks], ks=list(ks), image_embeds=z)
