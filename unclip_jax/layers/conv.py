"""2-D convolution with a hand-written backward pass that XLA:CPU runs well (NHWC, HWIO).

XLA's CPU backend runs the *forward* convolution of a U-Net close to the matmul peak, but
the two convolutions that ``jax.grad`` derives for the backward pass (input gradient as a
transposed conv, weight gradient as a conv with the batch as the contraction dimension)
run at a quarter of it (``shared/reference/cpu-performance.md``). :func:`conv2d_same`
is a ``jax.custom_vjp`` that expresses the same mathematics in shapes XLA handles well:

- input gradient of a stride-1 conv with symmetric padding ``p = k // 2`` (odd ``k``):
  a *forward* conv of the output gradient with the kernel flipped in space and its
  in/out channels swapped, padding ``k - 1 - p = p`` (the adjoint of a correlation is the
  correlation with the flipped kernel; Dumoulin & Visin 2016, "A guide to convolution
  arithmetic", section 4);
- weight gradient: ``dW[i, j] = sum_{b,h,w} xpad[b, h+i, w+j, :]^T g[b, h, w, :]``, one
  plain ``einsum`` contraction per kernel tap over shifted slices of the padded input.
  Each is an ordinary dot whose contraction runs over the batch, so under ``jax.jit``
  with a batch-sharded input XLA partitions it as local matmuls plus one all-reduce;
- stride 2 (``k = 3``, padding 1, PyTorch ``Conv2d(3, stride=2, padding=1)``): the weight
  gradient uses stride-2 slices, the input gradient is one matmul ``g @ W^T`` for all nine
  taps followed by a polyphase (even/odd row and column) scatter-add of the nine products;
- 1x1 kernels are plain matmuls (``einsum``) forward and backward.

Padding is symmetric ``k // 2`` on both sides, i.e. PyTorch ``Conv2d(padding=k//2)``; for
stride 1 and odd ``k`` it equals ``'SAME'``. Everything else (even kernels, other strides,
asymmetric padding, dilation) goes to ``lax.conv_general_dilated`` unchanged.

:class:`Conv` is a drop-in for ``flax.linen.Conv`` as the U-Nets use it: same parameter
names and shapes (``kernel`` [kh, kw, in, out], ``bias`` [out]), same dtype promotion,
logical axis names (KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT), and ``impl='custom_vjp'`` or
``'lax'`` to choose the implementation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from unclip_jax.layers import axes

Dtype = Any
PrecisionLike = Any

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("custom_vjp", "lax")
# Below this Cin * Cout the weight gradient uses XLA's own convolution. Measured (weight gradient alone,
# batch 8, same run): 32->32 at 64x64: XLA 70 ms, 9 tap dots 129 ms; 64->64 at 64x64: 517 vs 345 ms;
# 128->128 at 32x32: 165 vs 146 ms (the long-K, tiny-output dots are slow on XLA:CPU for narrow layers).
SMALL_CHANNELS_PRODUCT = 48 * 48

# Default of :class:`Conv` (``impl=None``): ``lax``. With jaxlib 0.10.2 XLA:CPU emits convolutions and their
# autodiff through YNNPACK; measured in one process (batch 8, 2 shared cores): weight gradient alone, lax vs
# the 9 tap dots: 192->64 at 64x64 166 vs 469 ms, 128->128 at 64x64 441 vs 556 ms, 256->128 at 32x32 130 vs
# 239 ms; input gradient equal (153 vs 144 ms); the decoder train step with every U-Net conv on custom_vjp
# was ~2x slower than on lax (thunk time 32.9 vs 8.5 s, temp 5.6 vs 3.6 GB: the strided tap slices become
# transposed copies). Keep custom_vjp for A/B runs (:func:`default_impl`) and other XLA versions.
_DEFAULT_IMPL = ["lax"]


@contextlib.contextmanager
def default_impl(impl: str) -> Iterator[None]:
    """Within the block, :class:`Conv` modules with ``impl=None`` trace with ``impl`` (A/B benchmarks).

    The choice is made when a model is traced (``init`` / ``apply`` / ``jit(...).lower``), so wrap those;
    ``jax.jit``'s trace cache does not see it, so jit a fresh function per choice.
    """
    if impl not in IMPLS:
        raise ValueError(f"default_impl({impl!r}): expected one of {IMPLS}")
    _DEFAULT_IMPL.append(impl)
    try:
        yield
    finally:
        _DEFAULT_IMPL.pop()


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, precision: PrecisionLike) -> jax.Array:
    """The reference: ``lax.conv_general_dilated`` with symmetric ``k // 2`` padding."""
    kh, kw = kernel.shape[:2]
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
    )


def conv2d_same_lax(x: jax.Array, kernel: jax.Array, stride: int = 1, precision: PrecisionLike = None) -> jax.Array:
    """Same maths as :func:`conv2d_same`, differentiated by ``jax.grad`` (the reference / fallback).

    Args:
      x: [B, H, W, Cin].
      kernel: [kh, kw, Cin, Cout].
      stride: spatial stride (both axes).
      precision: ``lax.Precision`` of the dots / convs.

    Returns:
      [B, H', W', Cout] with H' = (H + 2 (kh // 2) - kh) // stride + 1.
    """
    return _lax_conv(x, kernel, stride, precision)


def _tap_slices(xpad: jax.Array, kh: int, kw: int, ho: int, wo: int, stride: int):
    """Yields (i, j, xpad[:, i : i + stride*ho : stride, j : j + stride*wo : stride]) for each kernel tap."""
    for i in range(kh):
        for j in range(kw):
            yield (
                i,
                j,
                lax.slice(
                    xpad,
                    (0, i, j, 0),
                    (xpad.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xpad.shape[3]),
                    (1, stride, stride, 1),
                ),
            )


def _weight_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int, precision: PrecisionLike) -> jax.Array:
    """``dW[i, j] = einsum('bhwc,bhwo->co', xpad shifted by (i, j), g)``: kh*kw plain contractions.

    For narrow layers (``Cin * Cout < SMALL_CHANNELS_PRODUCT``) the long-K, tiny-output dots
    run slower on XLA:CPU than its own weight-gradient convolution, which is used instead.
    """
    if x.shape[-1] * g.shape[-1] < SMALL_CHANNELS_PRODUCT:
        kernel = jnp.zeros((kh, kw, x.shape[-1], g.shape[-1]), x.dtype)
        _, vjp = jax.vjp(lambda k: _lax_conv(x, k, stride, precision), kernel)
        return vjp(g)[0]
    ph, pw = kh // 2, kw // 2
    ho, wo = g.shape[1], g.shape[2]
    xpad = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))) if (ph or pw) else x
    taps = [
        jnp.einsum("bhwc,bhwo->co", xs, g, precision=precision, preferred_element_type=jnp.float32)
        for _, _, xs in _tap_slices(xpad, kh, kw, ho, wo, stride)
    ]
    return jnp.stack(taps).reshape(kh, kw, x.shape[-1], g.shape[-1])


def _input_grad_stride1(g: jax.Array, kernel: jax.Array, precision: PrecisionLike) -> jax.Array:
    """Adjoint of a stride-1 'same' correlation: forward conv with the flipped, in/out-swapped kernel."""
    kh, kw = kernel.shape[:2]
    if kh == 1 and kw == 1:
        return jnp.einsum("bhwo,co->bhwc", g, kernel[0, 0], precision=precision)
    k_t = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    return _lax_conv(g, k_t, 1, precision)


def _input_grad_stride2(g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int], precision: PrecisionLike):
    """Adjoint of a stride-2 3x3 conv with padding 1, by polyphase scatter-add of ``g @ W[i, j]^T``.

    Row ``2 o + i`` of the padded input receives tap ``i`` of output row ``o``: taps 0 and 2
    land on even rows (``m = o`` and ``m = o + 1``), tap 1 on odd rows (``m = o``); the same
    holds for columns. One matmul gives all nine products, the phases are summed with pads
    and interleaved, and the padding is cropped.
    """
    b, ho, wo, cout = g.shape
    cin = kernel.shape[2]
    h, w = in_hw
    p = jnp.einsum("bhwo,ijco->ijbhwc", g, kernel, precision=precision)  # [3, 3, B, Ho, Wo, Cin]

    def rows(q):  # q: [3, B, Ho, Wo', C] indexed by row tap -> [B, Ho+1, 2, Wo', C]
        even = jnp.pad(q[0], ((0, 0), (0, 1), (0, 0), (0, 0))) + jnp.pad(q[2], ((0, 0), (1, 0), (0, 0), (0, 0)))
        odd = jnp.pad(q[1], ((0, 0), (0, 1), (0, 0), (0, 0)))
        return jnp.stack([even, odd], axis=2)

    # Columns first (taps j), then rows (taps i).
    col_even = jnp.pad(p[:, 0], ((0, 0),) * 3 + ((0, 1), (0, 0))) + jnp.pad(p[:, 2], ((0, 0),) * 3 + ((1, 0), (0, 0)))
    col_odd = jnp.pad(p[:, 1], ((0, 0),) * 3 + ((0, 1), (0, 0)))
    q = jnp.stack([col_even, col_odd], axis=4)  # [3, B, Ho, Wo+1, 2, C]
    q = q.reshape(3, b, ho, 2 * (wo + 1), cin)
    full = rows(q).reshape(b, 2 * (ho + 1), 2 * (wo + 1), cin)
    return full[:, 1 : 1 + h, 1 : 1 + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_vjp(x: jax.Array, kernel: jax.Array, stride: int, precision: PrecisionLike) -> jax.Array:
    kh, kw = kernel.shape[:2]
    if kh == 1 and kw == 1 and stride == 1:
        return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0], precision=precision)
    return _lax_conv(x, kernel, stride, precision)


def _conv_vjp_fwd(x, kernel, stride, precision):
    return _conv_vjp(x, kernel, stride, precision), (x, kernel)


def _conv_vjp_bwd(stride, precision, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    g = g.astype(x.dtype)
    if stride == 1:
        dx = _input_grad_stride1(g, kernel, precision)
    else:
        dx = _input_grad_stride2(g, kernel, x.shape[1:3], precision)
    dw = _weight_grad(x, g, kh, kw, stride, precision)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_vjp.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def supports_custom_vjp(kernel_shape: Sequence[int], stride: int) -> bool:
    """Whether :func:`conv2d_same` uses the custom VJP for this kernel shape and stride (else lax).

    Args:
      kernel_shape: [kh, kw, Cin, Cout].
      stride: spatial stride.
    """
    kh, kw = kernel_shape[:2]
    if stride == 1:
        return kh % 2 == 1 and kw % 2 == 1
    return stride == 2 and kh == 3 and kw == 3


def conv2d_same(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    precision: PrecisionLike = None,
    impl: str = "custom_vjp",
) -> jax.Array:
    """kxk convolution with symmetric ``k // 2`` zero padding (PyTorch ``Conv2d(padding=k//2)``), NHWC.

    Pure function; jit / vmap / sharding friendly. With ``impl='custom_vjp'`` the backward
    pass is the one described in the module docstring (odd kernels at stride 1, 3x3 at
    stride 2); other shapes, and ``impl='lax'``, use ``lax.conv_general_dilated`` and its
    autodiff.

    Args:
      x: [B, H, W, Cin].
      kernel: [kh, kw, Cin, Cout] (HWIO), same dtype as ``x``.
      stride: spatial stride (both axes).
      precision: ``lax.Precision`` of the dots / convs.
      impl: "custom_vjp" or "lax".

    Returns:
      [B, H', W', Cout] with H' = (H + 2 (kh // 2) - kh) // stride + 1.
    """
    if impl not in IMPLS:
        raise ValueError(f"conv2d_same: impl={impl!r}; expected one of {IMPLS}")
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d_same: expected x [B, H, W, Cin] and kernel [kh, kw, Cin, Cout], got {x.shape} and {kernel.shape}"
        )
    if impl == "lax" or not supports_custom_vjp(kernel.shape, stride):
        return _lax_conv(x, kernel, stride, precision)
    return _conv_vjp(x, kernel, int(stride), precision)


def _is_symmetric_same(padding: Any, kernel_size: tuple[int, int], stride: int) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "SAME" and stride == 1
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    pads = tuple(_pair(p) if not isinstance(p, int) else (p, p) for p in padding)
    return pads == tuple((k // 2, k // 2) for k in kernel_size)


def default_kernel_init():
    """lecun_normal, logically partitioned as (KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT)."""
    return nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)
    )


def default_bias_init():
    """zeros, logically partitioned as (CONV_OUT,)."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,))


class Conv(nn.Module):
    """Drop-in for ``flax.linen.Conv`` (NHWC, 2-D) with the fast backward pass of :func:`conv2d_same`.

    Parameters are those of ``nn.Conv``: ``kernel`` [kh, kw, in, out] and ``bias`` [out], so
    checkpoints and weight converters are interchangeable. Padding must be symmetric
    ``k // 2`` (``'SAME'`` at stride 1, or explicit ``((k//2, k//2), (k//2, k//2))``) for the
    custom path; any other padding falls back to ``lax.conv_general_dilated``.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw) or an int.
      strides: an int or a pair with equal entries.
      padding: "SAME", an int, or ((top, bottom), (left, right)).
      use_bias: add a bias.
      dtype: compute dtype (inputs and params are promoted to it, as in ``nn.Conv``).
      param_dtype: parameter dtype.
      precision: ``lax.Precision`` of the dots / convs.
      kernel_init: kernel initialiser (default lecun_normal with logical axis names).
      bias_init: bias initialiser (default zeros with logical axis names).
      impl: "custom_vjp", "lax", or None (default): "lax" unless inside :func:`default_impl`.
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Any = None
    bias_init: Any = None
    impl: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, H', W', features]."""
        impl = self.impl or _DEFAULT_IMPL[-1]
        if impl not in IMPLS:
            raise ValueError(f"Conv.impl={self.impl!r}: expected one of {IMPLS} or None")
        if inputs.ndim != 4:
            raise ValueError(f"Conv: expected NHWC input [B, H, W, C], got shape {inputs.shape}")
        ks = _pair(self.kernel_size)
        sh, sw = _pair(self.strides)
        kernel = self.param(
            "kernel",
            self.kernel_init or default_kernel_init(),
            (ks[0], ks[1], inputs.shape[-1], self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init or default_bias_init(), (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if sh == sw and _is_symmetric_same(self.padding, ks, sh):
            y = conv2d_same(inputs, kernel, sh, self.precision, impl)
        else:
            y = lax.conv_general_dilated(
                inputs,
                kernel,
                window_strides=(sh, sw),
                padding=self.padding,
                dimension_numbers=DIMENSION_NUMBERS,
                precision=self.precision,
            )
        if bias is not None:
            y = y + bias.reshape((1, 1, 1, -1))
        return y
