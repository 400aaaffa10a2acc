"""U-Net building blocks of the unCLIP decoder and upsamplers (ADM / GLIDE), NHWC.

The numerics are those of the diffusers modules the Karlo weights load into, which in
turn follow OpenAI's guided-diffusion ADM U-Net (Dhariwal & Nichol 2021, "Diffusion
Models Beat GANs", section 3) and GLIDE (Nichol et al. 2021, section 2.3 / appendix):

- :class:`ResBlock` = diffusers ``ResnetBlock2D`` = ADM ``ResBlock``: GroupNorm, SiLU,
  optional nearest-up / average-pool-down of both branches (ADM ``resblock_updown``),
  3x3 conv, timestep conditioning either additive (``default``) or by adaptive group
  norm ``norm(h) * (1 + scale) + shift`` (``scale_shift``, ADM ``use_scale_shift_norm``),
  SiLU, dropout, 3x3 conv, 1x1 shortcut when the width changes.
- :class:`AddedKVAttention` = diffusers ``Attention`` with ``AttnAddedKVProcessor`` =
  GLIDE ``AttentionBlock`` with ``encoder_channels``: the projected context supplies extra
  keys/values that are concatenated *before* the spatial self-attention keys/values.
- :class:`DownBlock` / :class:`MidBlock` / :class:`UpBlock` = diffusers
  ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttnDownBlock2D``,
  ``UNetMidBlock2D`` / ``UNetMidBlock2DSimpleCrossAttn``, ``ResnetUpsampleBlock2D`` /
  ``SimpleCrossAttnUpBlock2D`` (attention on or off).

Parameter names mirror the diffusers module names (``resnets_0/norm1``,
``attentions_0/to_q``, ``downsamplers_0``...) so the weight bridge is a renaming.
Initialisation follows guided-diffusion: the last conv of each residual branch, the
attention output projection (and the U-Nets' final conv) start at zero (``zero_module``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.layers import axes
from unclip_jax.layers import norm as norm_lib
from unclip_jax.layers.attention import ATTENTION_SCOPE
from unclip_jax.layers.blockwise_attention import blockwise_attention
from unclip_jax.layers.conv import Conv
from unclip_jax.layers.transformer import dense

Dtype = Any

SPATIAL = (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED)

# diffusers builds every ``Attention`` of the SimpleCrossAttn blocks with its default eps.
ATTENTION_NORM_EPS = 1e-5
# Additive logit bias of masked context tokens (diffusers UNet2DConditionModel: (1 - mask) * -10000).
MASK_BIAS = -10000.0


def constrain_spatial(x: jnp.ndarray) -> jnp.ndarray:
    """Logical sharding constraint of a [B, H, W, C] activation."""
    return nn.with_logical_constraint(x, SPATIAL)


def group_norm(
    groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str, silu: bool = False
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """GroupNorm over channels, then SiLU when ``silu`` (float32 statistics, torch ``nn.GroupNorm``'s formula);
    parameters ``<name>/scale``, ``<name>/bias``.

    ``flax.linen.GroupNorm`` differentiated by XLA, with torch's two-pass variance ``mean((x - mean)^2)``
    (``flax``, the default of :func:`unclip_jax.layers.norm.default_impl`). ``flax_fast_variance`` selects the
    one-pass ``E[x^2] - E[x]^2`` (fewer passes over the activation, but its cancellation makes a sharded sampling
    chain drift from the unsharded one), ``custom`` :class:`unclip_jax.layers.norm.GroupNorm` (norm and SiLU in
    one custom VJP).
    """
    impl = norm_lib.current_impl()
    if impl == "custom":
        return norm_lib.GroupNorm(
            num_groups=groups, epsilon=eps, silu=silu, dtype=dtype, param_dtype=param_dtype, name=name
        )
    module = nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=impl == "flax_fast_variance",
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)),
        name=name,
    )
    return (lambda x: nn.silu(module(x))) if silu else module


def conv(
    features: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    kernel_size: int = 3,
    strides: int = 1,
    zero_init: bool = False,
) -> Conv:
    """kxk convolution with 'same' zero padding (torch ``Conv2d(padding=k//2)``), NHWC, HWIO kernel.

    :class:`unclip_jax.layers.conv.Conv` (parameters of ``nn.Conv``; the backward pass XLA:CPU runs
    well, ``impl`` from :func:`unclip_jax.layers.conv.default_impl`, ``'custom_vjp'`` by default).
    """
    init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    pad = kernel_size // 2
    return Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,)),
        name=name,
    )


def upsample_nearest(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour x2 upsampling (torch ``F.interpolate(scale_factor=2, mode='nearest')``).

    Args:
      x: [B, H, W, C].

    Returns:
      [B, 2H, 2W, C], constrained like every U-Net activation (the reshape of the broadcast would otherwise leave
      the partitioner free to split channels instead of the batch).
    """
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return constrain_spatial(x.reshape(b, 2 * h, 2 * w, c))


def downsample_avg(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 average pooling with stride 2 (torch ``AvgPool2d(2)``, ADM ``avg_pool_nd``).

    Args:
      x: [B, H, W, C] with even H and W.

    Returns:
      [B, H/2, W/2, C].
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"downsample_avg: spatial size {h}x{w} is not even")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (ADM ``ResBlock``; diffusers ``ResnetBlock2D``).

    ``out = shortcut(x') + conv2(drop(act(cond(norm2, conv1(act(norm1(x))')))))`` where ``'``
    is the optional up/down-sampling applied to both branches (ADM ``resblock_updown``),
    and ``cond`` is ``norm2(h) * (1 + scale) + shift`` for ``scale_shift`` or ``norm2(h + t)``
    for ``default``, with ``t = time_emb_proj(silu(temb))``.

    Attributes:
      out_channels: output width (default: input width).
      time_embedding_norm: "scale_shift" (ADM use_scale_shift_norm) or "default" (additive).
      groups: GroupNorm groups of both norms.
      eps: GroupNorm epsilon (diffusers ``norm_eps``).
      up: nearest x2 upsampling inside the block.
      down: 2x2 average-pool downsampling inside the block.
      dropout: dropout before ``conv2``.
      output_scale_factor: the sum is divided by it (diffusers ``output_scale_factor``).
    """

    out_channels: int | None = None
    time_embedding_norm: str = "scale_shift"
    groups: int = 32
    eps: float = 1e-5
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """Applies the block.

        Args:
          x: [B, H, W, Cin].
          temb: [B, T] timestep (+ conditioning) embedding.
          deterministic: disables dropout (needs the ``dropout`` rng when False).

        Returns:
          [B, H', W', out_channels] with H' = 2H (up), H/2 (down) or H.
        """
        if self.time_embedding_norm not in ("scale_shift", "default"):
            raise ValueError(
                f"ResBlock.time_embedding_norm={self.time_embedding_norm!r}: expected 'scale_shift' or 'default'"
            )
        if self.up and self.down:
            raise ValueError("ResBlock: up and down are exclusive")
        cin = x.shape[-1]
        cout = self.out_channels or cin
        h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm1", silu=True)(x)
        if self.up:
            x, h = upsample_nearest(x), upsample_nearest(h)
        elif self.down:
            x, h = downsample_avg(x), downsample_avg(h)
        h = conv(cout, self.dtype, self.param_dtype, "conv1")(h)
        t_feat = 2 * cout if self.time_embedding_norm == "scale_shift" else cout
        t = dense(t_feat, axes.EMBED, axes.CONV_OUT, self.dtype, self.param_dtype, "time_emb_proj")(nn.silu(temb))
        t = t[:, None, None, :]
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm2")(h)
            h = nn.silu(h * (1 + scale) + shift)
        else:
            h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm2", silu=True)(h + t)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(cout, self.dtype, self.param_dtype, "conv2", zero_init=True)(h)
        if cin != cout:
            x = dense(cout, axes.CONV_IN, axes.CONV_OUT, self.dtype, self.param_dtype, "conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain_spatial(out)


def _attend_bh_fwd_impl(q, k, v, keep):
    """Forward of :func:`_added_kv_attend_bh` (heads-major [B, H, L, D] layout)."""
    with jax.named_scope(ATTENTION_SCOPE):
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        logits = jnp.where(keep[:, None, None, :] > 0.5, logits, MASK_BIAS)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v), p


@jax.custom_vjp
def _added_kv_attend_bh(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, keep: jnp.ndarray) -> jnp.ndarray:
    """softmax(q k^T, masked) v for pre-scaled heads-major ``q`` [B, H, Lq, D], ``k``/``v`` [B, H, Lk, D], ``keep``
    [B, Lk] (1 = attend, 0 = logit replaced by ``MASK_BIAS``); the softmax in float32. Every contraction is a
    batched matmul with the batch dimensions leading (:data:`ATTENTION_LAYOUTS`).

    Custom VJP: the backward keeps only the probabilities [B, H, Lq, Lk] (as torch's autograd does) instead
    of the two logits-sized buffers per layer that XLA's autodiff of the fused softmax keeps alive.
    """
    return _attend_bh_fwd_impl(q, k, v, keep)[0]


def _added_kv_attend_bh_fwd(q, k, v, keep):
    out, p = _attend_bh_fwd_impl(q, k, v, keep)
    return out, (q, k, v, p, keep)


def _added_kv_attend_bh_bwd(res, g):
    q, k, v, p, keep = res
    with jax.named_scope(ATTENTION_SCOPE):
        dv = jnp.einsum("bhqk,bhqd->bhkd", p, g).astype(v.dtype)
        dp = jnp.einsum("bhqd,bhkd->bhqk", g, v).astype(jnp.float32)
        p32 = p.astype(jnp.float32)
        ds = (p32 * (dp - jnp.sum(dp * p32, axis=-1, keepdims=True))).astype(q.dtype)
        dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k).astype(q.dtype)
        dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q).astype(k.dtype)
    return dq, dk, dv, jnp.zeros_like(keep)


_added_kv_attend_bh.defvjp(_added_kv_attend_bh_fwd, _added_kv_attend_bh_bwd)

# The added-KV attention core, both heads-major (every contraction a batched matmul with its batch dimensions
# leading, as XLA:CPU's dot emitters want them): ``bhqd`` (the whole [B, H, Lq, Lk] probabilities at once) or
# ``blockwise`` (the default: :func:`blockwise_attention` over blocks of ``BLOCK_Q`` queries wherever there are
# more queries than one block, i.e. on 16x16 feature maps and above; ``bhqd`` below).
ATTENTION_LAYOUTS = ("bhqd", "blockwise")
_ATTENTION_LAYOUT = ["blockwise"]
BLOCK_Q = 128


@contextlib.contextmanager
def attention_layout(layout: str) -> Iterator[None]:
    """Within the block, :class:`AddedKVAttention` traces its core in ``layout`` (A/B benchmarks)."""
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention_layout({layout!r}): expected one of {ATTENTION_LAYOUTS}")
    _ATTENTION_LAYOUT.append(layout)
    try:
        yield
    finally:
        _ATTENTION_LAYOUT.pop()


class AddedKVAttention(nn.Module):
    """GLIDE attention over the image with the context as extra keys/values (diffusers ``AttnAddedKVProcessor``).

    ``h = GroupNorm(x)``; queries from ``h``; keys/values are
    ``[add_k_proj(context); to_k(h)]`` / ``[add_v_proj(context); to_v(h)]`` (context first);
    logits scaled by ``head_dim ** -0.5`` and soft-maxed in float32; ``x + to_out(attn)``.
    The context is not normalised here (``cross_attention_norm`` None); padded context
    tokens get the logit -10000 (diffusers adds -10000 to their logit: both give them
    weight exactly 0 in float32, since the 1024+ spatial keys are never masked). ``q`` is
    scaled before the dot (not the logits) and the core is :func:`_added_kv_attend_bh`, whose
    custom VJP keeps one probabilities tensor per layer (XLA:CPU autodiff kept two), or :func:`blockwise_attention`
    above one block of queries.

    Attributes:
      head_dim: channels per head (diffusers ``attention_head_dim``); heads = C // head_dim.
      groups: GroupNorm groups (the block's ``resnet_groups``).
      eps: GroupNorm epsilon (1e-5 in diffusers whatever ``norm_eps`` is).
    """

    head_dim: int = 64
    groups: int = 32
    eps: float = ATTENTION_NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray, context_mask: jnp.ndarray | None = None) -> jnp.ndarray:
        """Applies the attention block.

        Args:
          x: [B, H, W, C].
          context: [B, S, Dc] (unCLIP: 4 CLIP tokens + projected caption states).
          context_mask: optional [B, S] bool, True = attend.

        Returns:
          [B, H, W, C].
        """
        b, hh, ww, c = x.shape
        if c % self.head_dim:
            raise ValueError(f"AddedKVAttention: width {c} is not a multiple of head_dim {self.head_dim}")
        nh = c // self.head_dim
        h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "group_norm")(x)
        h = h.reshape(b, hh * ww, c)

        def proj(name, inp):
            y = dense(c, axes.EMBED, axes.HEADS, self.dtype, self.param_dtype, name)(inp)
            return y.reshape(b, inp.shape[1], nh, self.head_dim)

        q = proj("to_q", h)
        k = jnp.concatenate([proj("add_k_proj", context), proj("to_k", h)], axis=1)
        v = jnp.concatenate([proj("add_v_proj", context), proj("to_v", h)], axis=1)
        # Scale q (not the logits) and mask with a select: no logits-sized broadcast operands for XLA's fused dot.
        keep = jnp.ones((b, k.shape[1]), jnp.float32)
        if context_mask is not None:
            keep = jnp.pad(context_mask.astype(jnp.float32), ((0, 0), (0, hh * ww)), constant_values=1.0)
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        lq, heads_major = hh * ww, (0, 2, 1, 3)
        q, k, v = (t.transpose(heads_major) for t in (q, k, v))
        if _ATTENTION_LAYOUT[-1] == "blockwise" and lq > BLOCK_Q and lq % BLOCK_Q == 0:
            out = blockwise_attention(q, k, v, keep, BLOCK_Q, MASK_BIAS)
        else:
            out = _added_kv_attend_bh(q, k, v, keep)
        out = out.transpose(heads_major)
        out = out.reshape(b, hh * ww, c)
        out = nn.Dense(
            c,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.HEADS, axes.EMBED)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.EMBED,)),
            name="to_out",
        )(out)
        return constrain_spatial(x.astype(out.dtype) + out.reshape(b, hh, ww, c))


class _UNetBlock(nn.Module):
    """Fields shared by the U-Net stages (see :class:`DownBlock`)."""

    out_channels: int = 0
    num_layers: int = 1
    attention: bool = False
    head_dim: int = 64
    time_embedding_norm: str = "scale_shift"
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resblock(self, name: str, **kw) -> ResBlock:
        cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        return cls(
            out_channels=kw.pop("out_channels", self.out_channels),
            time_embedding_norm=self.time_embedding_norm,
            groups=self.groups,
            eps=self.eps,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **kw,
        )

    def attn(self, name: str) -> AddedKVAttention:
        cls = nn.remat(AddedKVAttention) if self.remat else AddedKVAttention
        return cls(
            head_dim=self.head_dim, groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def layer(
        self,
        i: int,
        x: jnp.ndarray,
        temb: jnp.ndarray,
        context: jnp.ndarray | None,
        context_mask: jnp.ndarray | None,
        deterministic: bool,
        **kw,
    ) -> jnp.ndarray:
        """ResBlock ``resnets_{i}`` then, when the block attends, attention ``attentions_{i}``."""
        x = self.resblock(f"resnets_{i}", **kw)(x, temb, deterministic)
        if self.attention:
            x = self.attn(f"attentions_{i}")(x, context, context_mask)
        return x

    def _check_context(self, context: jnp.ndarray | None) -> None:
        if self.attention and context is None:
            raise ValueError(f"{type(self).__name__} {self.name}: attention needs a context [B, S, Dc]")


class DownBlock(_UNetBlock):
    """One encoder level: ``num_layers`` x (ResBlock [+ attention]) then an optional down-sampling ResBlock.

    diffusers ``ResnetDownsampleBlock2D`` (attention False) / ``SimpleCrossAttnDownBlock2D``
    (attention True); ADM ``input_blocks`` of one level with ``resblock_updown=True``.

    Attributes:
      out_channels: width of the level.
      num_layers: residual blocks (ADM ``num_res_blocks``).
      attention: GLIDE attention after every residual block.
      add_downsample: end with a ``down=True`` ResBlock (``downsamplers_0``).
    """

    add_downsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        temb: jnp.ndarray,
        context: jnp.ndarray | None = None,
        context_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """[B, H, W, Cin] -> ([B, H', W', C], skip activations for the decoder side)."""
        self._check_context(context)
        skips = []
        for i in range(self.num_layers):
            x = self.layer(i, x, temb, context, context_mask, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = self.resblock("downsamplers_0", down=True)(x, temb, deterministic)
            skips.append(x)
        return x, skips


class MidBlock(_UNetBlock):
    """The middle: ResBlock, [attention], ResBlock at constant width.

    diffusers ``UNetMidBlock2DSimpleCrossAttn`` (attention True) / ``UNetMidBlock2D``
    with ``add_attention=False`` (attention False); ADM ``middle_block``.
    """

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        temb: jnp.ndarray,
        context: jnp.ndarray | None = None,
        context_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """[B, H, W, C] -> [B, H, W, C]."""
        self._check_context(context)
        c = x.shape[-1]
        x = self.layer(0, x, temb, context, context_mask, deterministic, out_channels=c)
        return self.resblock("resnets_1", out_channels=c)(x, temb, deterministic)


class UpBlock(_UNetBlock):
    """One decoder level: ``num_layers`` x (concat skip, ResBlock [+ attention]), optional up-sampling ResBlock.

    diffusers ``ResnetUpsampleBlock2D`` / ``SimpleCrossAttnUpBlock2D``; ADM ``output_blocks``
    of one level (``num_layers`` = ``num_res_blocks + 1``) with ``resblock_updown=True``.

    Attributes:
      add_upsample: end with an ``up=True`` ResBlock (``upsamplers_0``).
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        skips: list[jnp.ndarray],
        temb: jnp.ndarray,
        context: jnp.ndarray | None = None,
        context_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Consumes ``skips`` from the last; [B, H, W, Cin] -> [B, H', W', C]."""
        self._check_context(context)
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock {self.name}: got {len(skips)} skip activations, expected {self.num_layers}")
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = self.layer(i, x, temb, context, context_mask, deterministic)
        if self.add_upsample:
            x = self.resblock("upsamplers_0", up=True)(x, temb, deterministic)
        return x
