"""FID statistics and distance, KID, precision/recall: closed forms and independent re-implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from unclip_jax.evaluate import fid, kid


def _pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
    # pytorch-fid fid_score.calculate_frechet_distance, written out independently.
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _random_cov(rng, d, n):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    return np.cov(x, rowvar=False)


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-12)
    assert fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("d,n", [(64, 500), (128, 100)])  # full rank, and rank-deficient (n < d)
def test_frechet_distance_matches_pytorch_fid_formula(d, n):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    s1, s2 = _random_cov(rng, d, n), _random_cov(rng, d, n)
    want = _pytorch_fid_formula(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("d,n1,n2", [(96, 40, 30), (24, 300, 200)])  # rank-deficient, and full rank
def test_low_rank_frechet_distance_equals_sqrtm(d, n1, n2):
    rng = np.random.default_rng(n1)
    mix = rng.normal(size=(d, d)) * 0.3
    f1 = rng.normal(size=(n1, d)) @ mix + 0.2
    f2 = rng.normal(size=(n2, d)) @ mix * 1.3
    want = _pytorch_fid_formula(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    got = fid.frechet_distance_low_rank(f1, f2)
    assert got == pytest.approx(want, rel=1e-6)
    assert fid.fid_from_features(f1, f2, method="low_rank") == got
    assert fid.fid_from_features(f1, f2, method="sqrtm") == pytest.approx(want, rel=1e-6)
    # "auto" takes the low-rank route exactly when both sets are smaller than the feature dimension.
    auto = fid.fid_from_features(f1, f2)
    assert auto == (got if max(n1, n2) < d else fid.fid_from_features(f1, f2, method="sqrtm"))
    assert fid.frechet_distance_low_rank(f1, f1) == pytest.approx(0.0, abs=1e-8 * want)
    with pytest.raises(ValueError, match="method"):
        fid.fid_from_features(f1, f2, method="eig")
    with pytest.raises(ValueError, match=r"\[N >= 2, D\]"):
        fid.frechet_distance_low_rank(f1, f2[:, :-1])


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="different lengths"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_npz_round_trip_pytorch_fid_compatible(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=32), _random_cov(rng, 32, 100)
    fid.save_stats(tmp_path / "ref", mu, sigma)
    path = tmp_path / "ref.npz"
    with np.load(path) as f:  # how pytorch-fid reads precomputed statistics
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    m2, s2 = fid.load_stats(path)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match="lacks \\['sigma'\\]"):
        fid.load_stats(tmp_path / "bad.npz")


def test_streaming_stats_equal_one_shot_and_merge(tmp_path):
    rng = np.random.default_rng(2)
    feats = (rng.normal(size=(1000, 24)) * 3 + 5).astype(np.float32)
    want_mu, want_sigma = feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False)
    stats = fid.FeatureStats.empty(24)
    for s in range(0, 1000, 96):  # uneven batches
        stats = stats.update(feats[s : s + 96])
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, want_sigma, rtol=1e-10, atol=1e-12)
    # Two shards (e.g. two hosts) merged == one pass over everything.
    a = fid.FeatureStats.from_features(feats[:300])
    b = fid.FeatureStats.empty(24).update(feats[300:650]).update(feats[650:])
    merged = fid.merge_stats([a, b])
    np.testing.assert_allclose(merged.sigma, want_sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.mu, want_mu, rtol=1e-12)
    # Save / resume is exact.
    a.save(tmp_path / "shard0.npz")
    back = fid.FeatureStats.load(tmp_path / "shard0.npz")
    assert back.n == a.n
    np.testing.assert_array_equal(back.m2, a.m2)
    np.testing.assert_array_equal(fid.load_stats(tmp_path / "shard0.npz")[1], a.sigma)
    assert fid.allgather_stats(merged) is merged  # single process
    assert fid.fid_from_features(feats[:500], feats[500:]) == pytest.approx(
        _pytorch_fid_formula(
            feats[:500].astype(np.float64).mean(0),
            np.cov(feats[:500].astype(np.float64), rowvar=False),
            feats[500:].astype(np.float64).mean(0),
            np.cov(feats[500:].astype(np.float64), rowvar=False),
        ),
        rel=1e-9,
    )


def _mmd2_loops(x, y):
    # Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit sums.
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (sxx + syy) / (m * (m - 1)) - 2 * sxy / (m * m)


def test_kid():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 0.3
    assert kid.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    # One subset of everything: KID == the estimator on the full sets.
    r = kid.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
    assert r["subset_size"] == 20 and r["kid_mean"] == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    same_a, same_b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    shifted = rng.normal(size=(400, 16)) + 0.5
    k_same = kid.kernel_inception_distance(same_a, same_b, num_subsets=20, subset_size=200)
    k_diff = kid.kernel_inception_distance(same_a, shifted, num_subsets=20, subset_size=200)
    assert abs(k_same["kid_mean"]) < 3 * k_same["kid_std"] + 1e-3
    assert k_diff["kid_mean"] > 10 * abs(k_same["kid_mean"]) and k_diff["kid_mean"] > 5 * k_diff["kid_std"]


def test_precision_recall_brute_force():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(size=(50, 5)) * 0.5 + 0.8  # collapsed and shifted: precision > recall

    def brute(ref, query, k=3):
        dref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
        radii = np.sort(dref, axis=1)[:, k]
        dq = np.linalg.norm(query[:, None] - ref[None], axis=-1)
        return float((dq <= radii[None]).any(axis=1).mean())

    r = kid.precision_recall(real, fake, k=3, block=16)
    assert r["precision"] == pytest.approx(brute(real, fake))
    assert r["recall"] == pytest.approx(brute(fake, real))
    assert r["precision"] > r["recall"]
    same = kid.precision_recall(real, real)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
