"""Kernel Inception Distance and improved precision/recall on Inception features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs", section 3) is the unbiased estimate
of the squared MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
averaged over random subsets. Defaults follow clean-fid / torch-fidelity / StyleGAN2-ADA:
100 subsets of ``min(N1, N2, 1000)`` samples drawn without replacement.

Precision and recall follow Kynkaanniemi et al. 2019 ("Improved precision and recall
metric for assessing generative models", section 3): the real (resp. generated) manifold
is the union of balls around each sample with radius its distance to the k-th nearest
neighbour (k = 3) within the same set; precision is the fraction of generated samples
inside the real manifold, recall the fraction of real samples inside the generated one.
Distances are computed in float64 blocks.
"""

from __future__ import annotations

import numpy as np


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> np.ndarray:
    """``(gamma * x @ y.T + coef0) ** degree``; ``gamma`` defaults to ``1 / D``. ``[N, D], [M, D] -> [N, M]``."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with the polynomial kernel, for equal-sized ``[m, D]`` sets.

    ``1/(m(m-1)) sum_{i!=j} [k(x_i,x_j) + k(y_i,y_j)] - 2/m^2 sum_{i,j} k(x_i,y_j)``, as in
    clean-fid's ``kernel_distance`` and torch-fidelity's ``mmd2``.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"mmd2_unbiased: needs two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """KID between two feature sets: mean and std of :func:`mmd2_unbiased` over random subsets.

    Args:
      features1, features2: ``[N1, D]``, ``[N2, D]`` (e.g. real and generated pool3 features).
      num_subsets: number of subsets (100).
      subset_size: subset size cap; the size used is ``min(N1, N2, subset_size)``.
      degree, gamma, coef0: kernel parameters (3, 1/D, 1).
      seed: subset sampling seed.

    Returns:
      ``{"kid_mean", "kid_std", "subset_size", "num_subsets"}``.
    """
    f1 = np.asarray(features1, np.float64)
    f2 = np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature shapes {f1.shape} and {f2.shape} do not match")
    m = min(f1.shape[0], f2.shape[0], subset_size)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        vals.append(mmd2_unbiased(x, y, degree, gamma, coef0))
    vals = np.asarray(vals)
    return {"kid_mean": float(vals.mean()), "kid_std": float(vals.std()), "subset_size": m, "num_subsets": num_subsets}


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set (self excluded). ``[N, D] -> [N]``."""
    x = np.asarray(features, np.float64)
    if x.shape[0] <= k:
        raise ValueError(f"knn_radii: need more than k={k} samples, got {x.shape[0]}")
    out = np.empty(x.shape[0], np.float64)
    for s in range(0, x.shape[0], block):
        d = _sq_dists(x[s : s + block], x)
        # The sample itself is at distance 0: the k-th neighbour is the (k+1)-th smallest.
        out[s : s + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return out


def _coverage(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, block: int) -> float:
    inside = np.zeros(query.shape[0], bool)
    r2 = radii**2
    for s in range(0, query.shape[0], block):
        inside[s : s + block] = (_sq_dists(query[s : s + block], ref) <= r2[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` w.r.t. ``real`` features.

    Args:
      real, fake: ``[N, D]``, ``[M, D]`` features.
      k: neighbourhood size for the manifold radii (3 in the paper).
      block: rows per distance block.

    Returns:
      ``{"precision", "recall", "k"}``.
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    precision = _coverage(fake, real, knn_radii(real, k, block), block)
    recall = _coverage(real, fake, knn_radii(fake, k, block), block)
    return {"precision": precision, "recall": recall, "k": k}
