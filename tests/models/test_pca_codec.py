"""PCA + quantisation codec of the AR prior (paper section 2.2): reconstruction, round trips, bucket usage."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.models import pca_codec

N, D, RANK = 4096, 48, 6


@pytest.fixture(scope="module")
def data():
    """Embeddings with a known rank-6 structure (decreasing scales) plus 1e-3 noise, and paired "text" embeddings."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(D, RANK)))[0].T  # [RANK, D] orthonormal
    scales = np.array([4.0, 3.0, 2.0, 1.5, 1.0, 0.7])
    z = (rng.normal(size=(N, RANK)) * scales) @ basis + 1e-3 * rng.normal(size=(N, D)) + 0.5
    t = z + 2.0 * rng.normal(size=(N, D))
    return z, t, basis, scales


@pytest.fixture(scope="module")
def state(data):
    z, t, _, _ = data
    return pca_codec.fit(z, RANK, num_buckets=1024, text_embeds=t, num_dot_buckets=64)


def test_pca_recovers_the_low_rank_structure(data, state):
    z, _, basis, scales = data
    comps = state["components"]
    np.testing.assert_allclose(comps @ comps.T, np.eye(RANK), atol=1e-12)
    assert np.all(np.diff(state["eigenvalues"]) < 0)
    np.testing.assert_allclose(np.sqrt(state["eigenvalues"]), scales, rtol=0.05)
    # The kept subspace is the true one: projecting the true basis onto it loses nothing.
    np.testing.assert_allclose(np.linalg.norm(basis @ comps.T, axis=1), 1.0, atol=1e-5)
    _, _, ev = pca_codec.pca(z)
    assert pca_codec.num_components_for(ev, 0.01) <= RANK


def test_reconstruction_mse_below_one_percent(data, state):
    z = data[0]
    pca_only = pca_codec.relative_mse(state, z, quantized=False)
    quantized = pca_codec.relative_mse(state, z, quantized=True)
    assert pca_only < 1e-5
    assert quantized < 0.01, quantized
    # Too few components cannot reach it (the criterion is not vacuous).
    half = pca_codec.fit(z, RANK // 2, num_buckets=1024)
    assert pca_codec.relative_mse(half, z) > 0.01


def test_encode_decode_round_trip_numpy_and_jax(state):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1024, size=(2000, RANK)).astype(np.int32)
    codes[0], codes[1] = 0, 1023  # the open end buckets
    np.testing.assert_array_equal(pca_codec.encode(state, pca_codec.decode(state, codes)), codes)
    sj = pca_codec.to_jax(state, jnp.float32)
    back = pca_codec.encode(sj, pca_codec.decode(sj, jnp.asarray(codes)))
    np.testing.assert_array_equal(np.asarray(back), codes)
    dot_codes = np.arange(64)
    np.testing.assert_array_equal(
        pca_codec._bucketize(state["dot_edges"], pca_codec.decode_dot(state, dot_codes)), dot_codes
    )


def test_equal_mass_buckets_and_centres_inside(data):
    z = data[0]
    s = pca_codec.fit(z, RANK, num_buckets=64)
    codes = pca_codec.encode(s, z)
    for j in range(RANK):
        counts = np.bincount(codes[:, j], minlength=64)
        assert counts.min() >= N // 64 - 1 and counts.max() <= N // 64 + 1, counts
    edges, centres = s["edges"], s["centres"]
    assert np.all(np.diff(edges, axis=1) > 0)
    assert np.all(centres[:, 1:] >= edges) and np.all(centres[:, :-1] < edges)
    # Centres are the conditional means (up to the 5% margin): decoding training data beats bucket midpoints.
    coeffs = pca_codec.project(s, z)
    rec = pca_codec.dequantize(s, codes)
    mid = np.concatenate([edges[:, :1], (edges[:, 1:] + edges[:, :-1]) / 2, edges[:, -1:]], axis=1)
    rec_mid = mid[np.arange(RANK), codes]
    assert np.mean((rec - coeffs) ** 2) < np.mean((rec_mid - coeffs) ** 2)


def test_numpy_and_jax_encoders_agree(data, state):
    z = data[0][:512]
    np_codes = pca_codec.encode(state, z)
    jx_codes = np.asarray(pca_codec.encode(pca_codec.to_jax(state), jnp.asarray(z, jnp.float32)))
    assert np.mean(np_codes != jx_codes) < 1e-2  # float32 vs float64 only moves values sitting on an edge
    assert np.max(np.abs(np_codes - jx_codes)) <= 1


def test_dot_product_codes_are_ordered_and_equal_mass(data, state):
    z, t, _, _ = data
    cos = pca_codec.cosine(z, t)
    codes = pca_codec.encode_dot(state, z, t)
    order = np.argsort(cos)
    assert np.all(np.diff(codes[order]) >= 0)  # bucket order is value order
    counts = np.bincount(codes, minlength=64)
    assert counts.min() >= N // 64 - 1 and counts.max() <= N // 64 + 1
    err = np.abs(pca_codec.decode_dot(state, codes) - cos)
    interior = (codes > 0) & (codes < 63)  # the two open end buckets hold the tails
    assert err[interior].max() < 0.05 and err.mean() < 0.01


def test_save_load(tmp_path, state):
    path = str(tmp_path / "codec.npz")
    pca_codec.save(path, state)
    back = pca_codec.load(path)
    for k in pca_codec.STATE_KEYS:
        np.testing.assert_array_equal(back[k], state[k])
    np.savez(str(tmp_path / "bad.npz"), mean=state["mean"])
    with pytest.raises(ValueError, match="missing arrays"):
        pca_codec.load(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="shape mismatch"):
        pca_codec.check(state, pca_codec.shapes(D, RANK + 1, 1024, 64))
