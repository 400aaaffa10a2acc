"""Frechet Inception Distance: float64 statistics, streaming and mergeable, and pytorch-fid's distance.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium", eq. 6) is the Frechet distance between Gaussians fitted to
Inception pool3 features of two image sets:

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

:func:`frechet_distance` is pytorch-fid's ``calculate_frechet_distance`` step for step
(scipy ``sqrtm`` of the product; if that is not finite, ``eps`` is added to both
diagonals; a complex root is accepted only if the imaginary part of its diagonal is
below 1e-3, then its real part is used).

:class:`FeatureStats` accumulates the mean and the (unbiased, ``np.cov``) covariance of
a stream of feature batches in float64 (Chan, Golub & LeVeque's pairwise update), so an
evaluation can run shard by shard, save partial statistics, resume, and merge shards
from several hosts (:meth:`FeatureStats.merge`, :func:`allgather_stats`).

Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` arrays, the format of
pytorch-fid's ``--save-stats`` and its precomputed statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), exactly as pytorch-fid computes it.

    Args:
      mu1, mu2: means ``[D]``.
      sigma1, sigma2: covariances ``[D, D]``.
      eps: diagonal offset used when ``sqrtm(sigma1 @ sigma2)`` is not finite.

    Returns:
      The distance (float64).

    Raises:
      ValueError: mismatched shapes, or a matrix square root with a significant
        imaginary component (pytorch-fid's "Imaginary component" error).
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mean vectors have different lengths {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"frechet_distance: covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("fid calculation produces singular product; adding %s to diagonal of cov estimates", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"frechet_distance: imaginary component {m} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Running count, mean and centred second moment of feature vectors, in float64.

    Immutable: :meth:`update` and :meth:`merge` return new objects. ``m2`` is
    ``sum_i (x_i - mean)(x_i - mean)^T``; :attr:`sigma` is ``m2 / (n - 1)`` (``np.cov``).

    Attributes:
      n: number of feature vectors seen.
      mean: ``[D]`` float64.
      m2: ``[D, D]`` float64.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        """No features yet, dimension ``dim`` (2048 for pool3)."""
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of one batch ``[N, D]`` (computed in float64)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"FeatureStats: expected features [N, D], got shape {x.shape}")
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1], np.float64)
        c = x - mean
        return cls(int(x.shape[0]), mean, c.T @ c)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def mu(self) -> np.ndarray:
        """The mean ``[D]`` (pytorch-fid's ``mu``)."""
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (``np.cov(features, rowvar=False)``; pytorch-fid's ``sigma``)."""
        if self.n < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 features, have {self.n}")
        return self.m2 / (self.n - 1)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sets (Chan et al. 1979 pairwise combination)."""
        if self.dim != other.dim:
            raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureStats(n, mean, m2)

    def update(self, features: np.ndarray) -> FeatureStats:
        """Adds a batch ``[N, D]`` of features."""
        return self.merge(FeatureStats.from_features(features))

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``mu``/``sigma`` (pytorch-fid compatible) plus ``n``/``m2`` (exact resumption), atomically."""
        extra = {"n": np.asarray(self.n, np.int64), "m2": self.m2}
        save_stats(path, self.mu, self.sigma if self.n >= 2 else np.zeros_like(self.m2), **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Reads a file written by :meth:`save` (needs ``n`` and ``m2``, not only ``mu``/``sigma``)."""
        with np.load(path) as f:
            missing = [k for k in ("mu", "n", "m2") if k not in f.files]
            if missing:
                raise ValueError(f"{path}: lacks {missing}; only files written by FeatureStats.save can be resumed")
            return cls(int(f["n"]), np.asarray(f["mu"], np.float64), np.asarray(f["m2"], np.float64))


def merge_stats(stats: Iterable[FeatureStats]) -> FeatureStats:
    """Merges the statistics of disjoint shards."""
    it = iter(stats)
    out = next(it)
    for s in it:
        out = out.merge(s)
    return out


def allgather_stats(stats: FeatureStats) -> FeatureStats:
    """Merges every JAX process's statistics (each host passes its own; all get the union).

    float64 arrays travel bit-exactly as uint32 pairs, so the result does not depend on
    ``jax_enable_x64``.
    """
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return stats
    packed = np.concatenate([np.asarray([float(stats.n)]), stats.mean, stats.m2.ravel()]).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(packed))
    d = stats.dim
    parts = []
    for row in gathered:
        flat = np.ascontiguousarray(row).view(np.float64)
        parts.append(FeatureStats(int(flat[0]), flat[1 : 1 + d].copy(), flat[1 + d :].reshape(d, d).copy()))
    return merge_stats(parts)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: np.ndarray) -> None:
    """Writes ``mu``/``sigma`` (and any ``extra`` arrays) to an ``.npz`` that pytorch-fid reads.

    The file is written to a temporary name and renamed into place. A path without
    ``.npz`` gets it appended (as ``np.savez`` would).
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu, sigma)`` from an ``.npz`` (pytorch-fid's format), checking keys and shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: lacks {missing} (expected pytorch-fid statistics with 'mu' and 'sigma')")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape}; expected [D] and [D, D]")
    return mu, sigma


def fid_from_stats(
    a: FeatureStats | tuple[np.ndarray, np.ndarray], b: FeatureStats | tuple[np.ndarray, np.ndarray]
) -> float:
    """FID between two sets given as :class:`FeatureStats` or ``(mu, sigma)`` pairs."""

    def ms(s):
        return (s.mu, s.sigma) if isinstance(s, FeatureStats) else s

    (m1, s1), (m2, s2) = ms(a), ms(b)
    return frechet_distance(m1, s1, m2, s2)


def fid_from_features(features1: np.ndarray, features2: np.ndarray, method: str = "auto") -> float:
    """FID between two feature sets ``[N1, D]``, ``[N2, D]`` (float64 statistics).

    ``method``: ``"sqrtm"`` (pytorch-fid's :func:`frechet_distance` on the D x D covariances), ``"low_rank"``
    (:func:`frechet_distance_low_rank`, exact for any N, O(N1 N2 D) instead of O(D^3)) or ``"auto"``
    (low rank when both sets have fewer than D vectors, where the covariances are singular anyway).
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if method not in ("auto", "sqrtm", "low_rank"):
        raise ValueError(f"fid_from_features: method must be 'auto', 'sqrtm' or 'low_rank', got {method!r}")
    if method == "low_rank" or (method == "auto" and max(len(f1), len(f2)) < f1.shape[-1]):
        return frechet_distance_low_rank(f1, f2)
    return fid_from_stats(FeatureStats.from_features(f1), FeatureStats.from_features(f2))


def frechet_distance_low_rank(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance of the two sets' Gaussians computed through the N1 x N2 cross-Gram matrix.

    With centred features A1 ``[N1, D]``, A2 ``[N2, D]`` and unbiased covariances S_k = A_k^T A_k / (N_k - 1), the
    non-zero eigenvalues of S1 S2 are those of M M^T with M = A1 A2^T / sqrt((N1 - 1)(N2 - 1)), so
    Tr (S1 S2)^(1/2) is the nuclear norm of M (the sum of its singular values) and Tr S_k = ||A_k||_F^2 / (N_k - 1).
    The same d^2 as :func:`frechet_distance` without its D x D ``sqrtm`` (seconds for D = 2048), and without the
    numerical trouble ``sqrtm`` has with the singular products of small sets.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"frechet_distance_low_rank: need two [N >= 2, D] feature sets, got {f1.shape}, {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mu1, f2 - mu2
    n1, n2 = len(f1) - 1, len(f2) - 1
    cross = a1 @ a2.T / np.sqrt(n1 * n2)
    tr_covmean = np.linalg.svd(cross, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + (a1 * a1).sum() / n1 + (a2 * a2).sum() / n2 - 2 * tr_covmean)
