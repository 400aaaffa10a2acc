"""conv2d_same / Conv (unclip_jax/layers/conv.py): forward and all gradients equal lax's, sharded = unsharded."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax.layers import axes
from unclip_jax.layers import conv as conv_lib
from unclip_jax.layers.conv import Conv, conv2d_same, conv2d_same_lax

HIGHEST = jax.lax.Precision.HIGHEST

# (B, H, W, Cin, Cout, k, stride): odd sizes, in != out, both weight-gradient paths
# (Cin * Cout below and above SMALL_CHANNELS_PRODUCT), 1x1, 5x5 and stride 2 (even and odd sizes).
SHAPES = [
    (2, 7, 5, 3, 6, 3, 1),
    (2, 9, 6, 48, 56, 3, 1),
    (1, 5, 8, 64, 40, 1, 1),
    (2, 6, 7, 5, 4, 5, 1),
    (2, 8, 6, 52, 48, 3, 2),
    (3, 7, 9, 4, 5, 3, 2),
]


def _data(shape):
    b, h, w, cin, cout, k, stride = shape
    ho = (h + 2 * (k // 2) - k) // stride + 1
    wo = (w + 2 * (k // 2) - k) // stride + 1
    x = _normal(sum(shape), (b, h, w, cin))
    kernel = _normal(sum(shape) + 1, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    g = _normal(sum(shape) + 2, (b, ho, wo, cout))
    return x, kernel, g


def _normal(seed: int, shape) -> np.ndarray:
    """Host-side random data (no per-shape XLA compiles in the tests)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_custom_path_covers_all_shapes():
    for shape in SHAPES:
        assert conv_lib.supports_custom_vjp((shape[5], shape[5], shape[3], shape[4]), shape[6]), shape
    # Both weight-gradient formulations are exercised.
    products = [s[3] * s[4] for s in SHAPES if s[5] > 1]
    assert min(products) < conv_lib.SMALL_CHANNELS_PRODUCT <= max(products)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads_equal_lax(shape):
    x, kernel, g = _data(shape)
    k, stride = shape[5], shape[6]

    @jax.jit
    def both(x, kernel):
        y_ref = jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((k // 2,) * 2,) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=HIGHEST,
        )
        outs = []
        for fn in (conv2d_same, conv2d_same_lax):
            y, vjp = jax.vjp(lambda x, kk, fn=fn: fn(x, kk, stride, HIGHEST), x, kernel)
            outs.append((y, *vjp(g)))
        return y_ref, outs

    y_ref, ((y, dx, dk), (y_lax, dx_ref, dk_ref)) = both(x, kernel)
    assert y.shape == y_ref.shape == g.shape
    assert _rel(y, y_ref) < 1e-6 and _rel(y_lax, y_ref) < 1e-6
    assert _rel(dx, dx_ref) < 1e-5
    assert _rel(dk, dk_ref) < 1e-5


def _grads(module, params, x, g):
    """Output and (param, input) gradients of sum(module(x) * g), jitted."""

    @jax.jit
    def f(params, x):
        y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return y, vjp(g.astype(y.dtype))

    return f(params, x)


def _assert_close_trees(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.shape == v.shape and _rel(u, v) < tol


def test_module_params_match_nn_conv_and_all_grads_equal():
    kw = dict(features=56, kernel_size=(3, 3), padding=((1, 1), (1, 1)), precision=HIGHEST)
    ours, ours_lax, flax_conv = Conv(**kw), Conv(impl="lax", **kw), nn.Conv(**kw)
    x = _normal(0, (2, 9, 7, 48))
    variables = jax.jit(ours.init)(jax.random.key(1), x)
    # Logical names on the boxes, identical tree/shapes to nn.Conv.
    assert variables["params"]["kernel"].names == (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)
    assert variables["params"]["bias"].names == (axes.CONV_OUT,)
    params = nn.unbox(variables)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, jax.eval_shape(flax_conv.init, jax.random.key(1), x)
    )
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * _normal(2, p.shape), params)
    g = _normal(3, (2, 9, 7, 56))
    y, grads = _grads(ours, params, x, g)
    for ref in (ours_lax, flax_conv):
        y_ref, ref_grads = _grads(ref, params, x, g)
        assert _rel(y, y_ref) < 1e-6
        _assert_close_trees(grads, ref_grads, 1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1))),  # custom stride-2 path
        dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME"),  # asymmetric pads at stride 2: lax fallback
        dict(kernel_size=(2, 2), padding="VALID", use_bias=False),  # even kernel: lax fallback
    ],
    ids=["stride2", "stride2_same", "even_valid"],
)
def test_module_stride2_and_fallbacks_match_nn_conv(kw):
    x = _normal(0, (2, 8, 9, 6))
    ours, ref = Conv(features=5, precision=HIGHEST, **kw), nn.Conv(features=5, precision=HIGHEST, **kw)
    params = nn.unbox(jax.jit(ours.init)(jax.random.key(1), x))
    g = _normal(2, jax.eval_shape(ref.apply, params, x).shape)
    y, grads = _grads(ours, params, x, g)
    y_ref, ref_grads = _grads(ref, params, x, g)
    assert _rel(y, y_ref) < 1e-6
    _assert_close_trees(grads, ref_grads, 1e-5)


def test_bf16_runs_and_tracks_float32():
    module, module32 = Conv(features=56, dtype=jnp.bfloat16), Conv(features=56, precision=HIGHEST)
    x = _normal(0, (2, 8, 8, 48))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(1), x))
    g = _normal(2, (2, 8, 8, 56))
    y, grads = _grads(module, params, x, g)
    y32, grads32 = _grads(module32, params, x, g)
    assert y.dtype == jnp.bfloat16
    assert grads[0]["params"]["kernel"].dtype == jnp.float32  # param_dtype
    assert grads[1].dtype == jnp.float32  # the input's dtype
    assert _rel(y, y32) < 2e-2
    _assert_close_trees(grads, grads32, 3e-2)


def test_vmap_matches_unbatched():
    x, kernel, g = _data((2, 6, 6, 48, 56, 3, 1))
    xs = np.stack([x, 2 * x])

    @jax.jit
    def run(xs, kernel):
        f = jax.grad(lambda x, k: jnp.sum(conv2d_same(x, k, 1, HIGHEST) * g), (0, 1))
        ref = jax.grad(lambda x, k: jnp.sum(conv2d_same_lax(x, k, 1, HIGHEST) * g), (0, 1))
        return jax.vmap(f, in_axes=(0, None))(xs, kernel), [ref(xs[i], kernel) for i in range(2)]

    (dxs, dks), refs = run(xs, kernel)
    for i, (dx, dk) in enumerate(refs):
        assert _rel(dxs[i], dx) < 1e-5 and _rel(dks[i], dk) < 1e-5


def test_jit_batch_sharded_equals_unsharded():
    """Two stacked convs (8 -> 48 -> 64 channels: both weight-gradient paths) under a batch-sharded jit."""
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    x, k1, _ = _data((8, 10, 6, 8, 48, 3, 1))
    _, k2, g = _data((8, 10, 6, 48, 64, 3, 1))
    bias = np.linspace(-1.0, 1.0, 64, dtype=np.float32)

    def loss(x, k1, k2, b, g):
        h = jax.nn.silu(conv2d_same(x, k1, 1, HIGHEST))
        return jnp.mean(jnp.square(conv2d_same(h, k2, 1, HIGHEST) + b - g))

    step = jax.value_and_grad(loss, (0, 1, 2, 3))
    ref_loss, ref_grads = jax.jit(step)(x, k1, k2, bias, g)
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded_step = jax.jit(
        step,
        in_shardings=(batch, replicated, replicated, replicated, batch),
        out_shardings=(replicated, (batch, replicated, replicated, replicated)),
    )
    xs, gs = jax.device_put(x, batch), jax.device_put(g, batch)
    hlo = sharded_step.lower(xs, k1, k2, bias, gs).compile().as_text()
    assert "all-reduce" in hlo  # the weight gradients are reduced across the batch shards ...
    assert "all-gather" not in hlo  # ... and the batch-sharded activations are never gathered
    loss_s, grads_s = sharded_step(xs, k1, k2, bias, gs)
    assert grads_s[0].sharding.spec == P("data")
    assert abs(float(loss_s) - float(ref_loss)) < 1e-6 * abs(float(ref_loss))
    for a, b in zip(grads_s, ref_grads, strict=True):
        assert _rel(a, b) < 1e-5
