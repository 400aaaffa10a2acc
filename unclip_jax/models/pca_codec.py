"""PCA + per-component quantisation codec of CLIP image embeddings for the autoregressive prior.

Paper: Ramesh et al. 2022, section 2.2 ("Autoregressive (AR) prior") and appendix C: the
image embedding z_i is reduced by PCA (319 of 1024 components keep the reconstruction MSE
under 1%), components are ordered by decreasing eigenvalue, and each is quantised into
1024 buckets; the prior predicts the resulting sequence of discrete codes. The prefix
also holds one token for the quantised dot product z_i . z_t.

The fitted codec is a ``dict[str, np.ndarray]`` (the "state"), fitted in float64 on
training embeddings, saved as ``.npz`` (:func:`save` / :func:`load`) and carried inside
the model's variables as the non-trainable ``stats`` collection
(:class:`unclip_jax.models.ar_prior.ARPrior`), so a checkpoint or export always holds
the codec its codes were trained with.

State (D = embedding width, k = components, V = buckets per component, Vd = dot buckets)::

    mean          [D]        training mean of z_i
    components    [k, D]     orthonormal principal axes, rows ordered by decreasing eigenvalue;
                             sign fixed so that each row's largest-|.| entry is positive
    eigenvalues   [k]        variance of z_i along each row (decreasing)
    total_variance []        sum of the per-dimension variances of z_i (all D)
    edges         [k, V-1]   inner bucket edges of each component (strictly increasing)
    centres       [k, V]     value each code decodes to (inside its bucket)
    dot_edges     [Vd-1]     inner edges of the dot-product buckets
    dot_centres   [Vd]       value each dot-product code decodes to

Bucket edges (why equal-mass quantiles): the edges of component j are the
``1/V, 2/V, ..., (V-1)/V`` quantiles of the training coefficients of that component, so
every code is used equally often on the training set (maximum-entropy tokens, no wasted
vocabulary on the long tails, a balanced softmax target) and the buckets are narrow where
coefficients are dense, which is where most of the reconstruction error would otherwise
come from. Each bucket decodes to the conditional mean of the training coefficients that
fall in it (the MSE-optimal reconstruction for the empirical distribution given the
edges, Lloyd's centroid condition); an empty bucket (fewer training examples than
buckets) decodes to its midpoint. Centres are then clipped to lie strictly inside their
bucket (at least 5% of its width from either edge), so ``encode(decode(codes)) == codes``
holds exactly in float64 and with margin in float32. Bucket ``c`` of component ``j`` is
``[edges[j, c-1], edges[j, c])`` with ``edges[j, -1] = -inf`` and ``edges[j, V-1] = +inf``
(``searchsorted(edges, x, side="right")``).

Dot product: ``dot = <z_i / |z_i|, z_t / |z_t|>`` (the cosine, i.e. the paper's z_i . z_t
of unit-norm CLIP embeddings); quantised the same way into its own vocabulary of Vd
equal-mass buckets, so bucket index order is value order (the sampler's "top half" of
the dot-product distribution relies on this).

All functions take numpy or jax arrays: numpy inputs are computed in numpy (float64 if
given float64), jax inputs in ``jax.numpy`` (jit-able; the codec is then used in float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

State = dict[str, Any]

STATE_KEYS = (
    "mean",
    "components",
    "eigenvalues",
    "total_variance",
    "edges",
    "centres",
    "dot_edges",
    "dot_centres",
)
CENTRE_MARGIN = 0.05  # centres keep this fraction of their bucket's width from either edge


def _xp(*arrays: Any):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


# ----------------------------------------------------------------------------- fitting


def pca(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of ``embeddings`` in float64.

    Args:
      embeddings: [N, D].

    Returns:
      (mean [D], components [D, D] rows orthonormal, ordered by decreasing eigenvalue, sign
      fixed so each row's largest-magnitude entry is positive; eigenvalues [D] decreasing,
      the population variance (divided by N) along each row).
    """
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca: expected embeddings [N >= 2, D], got shape {x.shape}")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    comps = evecs[:, order].T
    sign = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(sign == 0, 1.0, sign)[:, None]
    return mean, comps, evals


def num_components_for(eigenvalues: np.ndarray, max_relative_mse: float = 0.01) -> int:
    """Smallest k whose PCA reconstruction MSE is below ``max_relative_mse`` of the total variance.

    The residual of keeping k components is the sum of the remaining eigenvalues (the
    paper's criterion for 319 of 1024, section 2.2).
    """
    ev = np.asarray(eigenvalues, np.float64)
    total = ev.sum()
    if total <= 0:
        return 1
    residual = total - np.cumsum(ev)  # residual[k-1] = error with k components
    return int(np.argmax(residual < max_relative_mse * total) + 1)


def _strictly_increasing(edges: np.ndarray, scale: float) -> np.ndarray:
    """Forces a strictly increasing edge list (ties in the data would otherwise make empty buckets)."""
    # out[i] = max(edges[i], out[i-1] + gap)  <=>  out[i] - i*gap = cummax(edges - i*gap)[i].
    gap = max(scale, 1e-12) * 1e-6
    steps = np.arange(len(edges)) * gap
    return np.maximum.accumulate(edges - steps) + steps


def fit_buckets(values: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-mass bucket edges and conditional-mean centres of one scalar variable.

    Args:
      values: [N] training values (float64).
      num_buckets: V >= 2.

    Returns:
      (edges [V-1] strictly increasing, centres [V]) as described in the module docstring.
    """
    if num_buckets < 2:
        raise ValueError(f"num_buckets={num_buckets}: need at least 2 buckets")
    v = np.asarray(values, np.float64)
    scale = float(v.std()) or 1.0
    q = np.arange(1, num_buckets) / num_buckets
    edges = _strictly_increasing(np.quantile(v, q), scale)
    idx = np.searchsorted(edges, v, side="right")
    counts = np.bincount(idx, minlength=num_buckets).astype(np.float64)
    sums = np.bincount(idx, weights=v, minlength=num_buckets)
    # Bounds of each bucket; the open end buckets get the width of their neighbour.
    if num_buckets > 2:
        first_w, last_w = edges[1] - edges[0], edges[-1] - edges[-2]
    else:
        first_w = last_w = scale
    lo = np.concatenate([[edges[0] - first_w], edges])
    hi = np.concatenate([edges, [edges[-1] + last_w]])
    mid = (lo + hi) / 2
    centres = np.where(counts > 0, sums / np.maximum(counts, 1), mid)
    margin = CENTRE_MARGIN * (hi - lo)
    upper = hi - margin
    lower = lo + margin
    lower[0] = -np.inf  # the open end buckets only need to stay clear of their one real edge
    upper[-1] = np.inf
    centres = np.clip(centres, lower, upper)
    return edges, centres


def cosine(a: Any, b: Any) -> Any:
    """Row-wise cosine ``<a/|a|, b/|b|>``: [..., D] x [..., D] -> [...]."""
    xp = _xp(a, b)
    na = xp.linalg.norm(a, axis=-1)
    nb = xp.linalg.norm(b, axis=-1)
    return xp.sum(a * b, axis=-1) / xp.maximum(na * nb, 1e-12)


def fit(
    image_embeds: np.ndarray,
    num_components: int,
    num_buckets: int = 1024,
    text_embeds: np.ndarray | None = None,
    num_dot_buckets: int = 1024,
) -> State:
    """Fits the codec on training embeddings (float64 numpy).

    Args:
      image_embeds: [N, D] CLIP image embeddings z_i of the training set.
      num_components: k <= D components to keep (319 of 1024 in the paper; see
        :func:`num_components_for`).
      num_buckets: V buckets per component (1024 in the paper).
      text_embeds: [N, D] the paired CLIP text embeddings z_t, for the dot-product buckets;
        None fits the dot-product buckets to the uniform grid on [-1, 1].
      num_dot_buckets: Vd buckets of the dot-product token.

    Returns:
      The state dict (keys :data:`STATE_KEYS`, float64 arrays).
    """
    z = np.asarray(image_embeds, np.float64)
    d = z.shape[-1]
    if not 1 <= num_components <= d:
        raise ValueError(f"num_components={num_components}: expected 1..{d} (the embedding width)")
    mean, comps, evals = pca(z)
    comps, evals = comps[:num_components], evals[:num_components]
    coeffs = (z - mean) @ comps.T
    edges, centres = zip(*(fit_buckets(coeffs[:, j], num_buckets) for j in range(num_components)))
    if text_embeds is not None:
        t = np.asarray(text_embeds, np.float64)
        if t.shape != z.shape:
            raise ValueError(f"fit: text_embeds shape {t.shape} != image_embeds shape {z.shape}")
        dot_edges, dot_centres = fit_buckets(cosine(z, t), num_dot_buckets)
    else:
        grid = np.linspace(-1.0, 1.0, num_dot_buckets + 1)
        dot_edges, dot_centres = grid[1:-1], (grid[1:] + grid[:-1]) / 2
    return dict(
        mean=mean,
        components=comps,
        eigenvalues=evals,
        total_variance=np.asarray(z.var(0).sum()),
        edges=np.stack(edges),
        centres=np.stack(centres),
        dot_edges=dot_edges,
        dot_centres=dot_centres,
    )


# ----------------------------------------------------------------------------- encode / decode


def project(state: State, image_embeds: Any) -> Any:
    """PCA coefficients: [..., D] -> [..., k]."""
    return (image_embeds - state["mean"]) @ state["components"].T


def reconstruct(state: State, coeffs: Any) -> Any:
    """Inverse of :func:`project` on the kept subspace: [..., k] -> [..., D]."""
    return coeffs @ state["components"] + state["mean"]


def _bucketize(edges: Any, values: Any) -> Any:
    """Bucket index of each value (``searchsorted(edges, v, side="right")``), int32."""
    xp = _xp(edges, values)
    if xp is np:
        return np.searchsorted(edges, values, side="right").astype(np.int32)
    return jnp.searchsorted(edges, values, side="right").astype(jnp.int32)


def quantize(state: State, coeffs: Any) -> Any:
    """Codes of PCA coefficients: [..., k] float -> [..., k] int32 in [0, V)."""
    edges = state["edges"]
    xp = _xp(edges, coeffs)
    if xp is np:
        return np.stack([_bucketize(edges[j], coeffs[..., j]) for j in range(edges.shape[0])], axis=-1)
    flat = coeffs.reshape(-1, coeffs.shape[-1])
    codes = jax.vmap(_bucketize, in_axes=(0, 1), out_axes=1)(jnp.asarray(edges, flat.dtype), flat)
    return codes.reshape(coeffs.shape)


def dequantize(state: State, codes: Any) -> Any:
    """Bucket centres of codes: [..., k] int -> [..., k] float."""
    centres = state["centres"]
    xp = _xp(centres, codes)
    k = centres.shape[0]
    return centres[xp.arange(k), codes]


def encode(state: State, image_embeds: Any) -> Any:
    """Image embeddings -> codes: [..., D] -> [..., k] int32 (project, then quantise)."""
    return quantize(state, project(state, image_embeds))


def decode(state: State, codes: Any) -> Any:
    """Codes -> image embeddings: [..., k] int -> [..., D] (bucket centres, then reconstruct)."""
    return reconstruct(state, dequantize(state, codes))


def encode_dot(state: State, image_embeds: Any, text_embeds: Any) -> Any:
    """Quantised cosine of z_i and z_t: [..., D] x [..., D] -> [...] int32 in [0, Vd)."""
    return _bucketize(state["dot_edges"], cosine(image_embeds, text_embeds))


def decode_dot(state: State, dot_codes: Any) -> Any:
    """Dot-product codes -> the cosine each stands for: [...] int -> [...] float."""
    return state["dot_centres"][dot_codes]


def relative_mse(state: State, image_embeds: Any, quantized: bool = True) -> float:
    """Reconstruction MSE divided by the total variance (the paper's "under 1%" criterion)."""
    z = np.asarray(image_embeds, np.float64)
    s = to_numpy(state)
    rec = decode(s, encode(s, z)) if quantized else reconstruct(s, project(s, z))
    return float(np.sum((rec - z) ** 2, -1).mean() / s["total_variance"])


# ----------------------------------------------------------------------------- storage


def shapes(embedding_dim: int, num_components: int, num_buckets: int, num_dot_buckets: int) -> dict[str, tuple]:
    """Array shapes of a state (used to create the model's codec collection at init)."""
    return dict(
        mean=(embedding_dim,),
        components=(num_components, embedding_dim),
        eigenvalues=(num_components,),
        total_variance=(),
        edges=(num_components, num_buckets - 1),
        centres=(num_components, num_buckets),
        dot_edges=(num_dot_buckets - 1,),
        dot_centres=(num_dot_buckets,),
    )


def check(state: State, expected: dict[str, tuple] | None = None, where: str = "codec") -> None:
    """Raises naming the missing / mis-shaped arrays of a state."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{where}: missing arrays {missing}; it has {sorted(state)} (expected {list(STATE_KEYS)})")
    if expected is not None:
        bad = {k: (tuple(np.shape(state[k])), v) for k, v in expected.items() if tuple(np.shape(state[k])) != v}
        if bad:
            raise ValueError(f"{where}: shape mismatch {{name: (got, expected)}} = {bad}")


def to_numpy(state: State, dtype: Any = np.float64) -> State:
    return {k: np.asarray(state[k], dtype) for k in STATE_KEYS}


def to_jax(state: State, dtype: Any = jnp.float32) -> State:
    return {k: jnp.asarray(np.asarray(state[k]), dtype) for k in STATE_KEYS}


def save(path: str, state: State) -> None:
    """Writes the state as an uncompressed ``.npz`` (float64)."""
    check(state, where=path)
    np.savez(path, **to_numpy(state))


def load(path: str) -> State:
    """Reads a state written by :func:`save`; the error names the file and what is missing."""
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"codec file {path!r} not found (write it with pca_codec.save)") from e
    check(state, where=path)
    return to_numpy(state)
