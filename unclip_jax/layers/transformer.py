"""Pre-LayerNorm transformer block and MLP shared by the prior, CLIP and the AR prior.

Block maths (GPT-2 / CLIP / diffusers ``BasicTransformerBlock`` without cross-attention):
``x = x + Attn(LN1(x))``; ``x = x + MLP(LN2(x))`` with ``MLP = fc2(act(fc1(.)))``.
Parameter names: ``norm1``, ``attn`` (:class:`MultiHeadAttention`), ``norm2``,
``mlp/fc1``, ``mlp/fc2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.layers import axes
from unclip_jax.layers.attention import MultiHeadAttention

Dtype = Any


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (transformers ``quick_gelu``)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() / diffusers "gelu"
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Looks up an activation by its diffusers/transformers name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with (NORM,) logical axes on scale and bias (torch ``nn.LayerNorm`` numerics)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.NORM,)),
        name=name,
    )


def dense(features: int, in_axis: str, out_axis: str, dtype: Dtype, param_dtype: Dtype, name: str, use_bias=True):
    """Dense with logical axes ``(in_axis, out_axis)`` on the kernel and ``(out_axis,)`` on the bias."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
        name=name,
    )


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc2(dropout(act(fc1(x))))`` (diffusers ``FeedForward``, CLIP ``CLIPMLP``).

    Attributes:
      mlp_dim: hidden width.
      act: activation name (see :data:`ACTIVATIONS`).
      dropout_rate: dropout after the activation.
    """

    mlp_dim: int
    act: str = "gelu"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """[B, L, D] -> [B, L, D]."""
        d = x.shape[-1]
        h = dense(self.mlp_dim, axes.EMBED, axes.MLP, self.dtype, self.param_dtype, "fc1")(x)
        h = activation(self.act)(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(d, axes.MLP, axes.EMBED, self.dtype, self.param_dtype, "fc2")(h)


class TransformerBlock(nn.Module):
    """Pre-LN residual block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    Attributes:
      num_heads, head_dim: attention shape (inner width ``num_heads * head_dim``).
      mlp_dim: feed-forward hidden width.
      act: MLP activation ("gelu" for the diffusers prior, "quick_gelu" for OpenAI CLIP).
      layer_norm_eps: LayerNorm epsilon (1e-5 in both references).
      dropout_rate: dropout on the attention output and inside the MLP.
      decode: key/value cache for incremental decoding (AR prior).
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    act: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
        """Args: x [B, L, D]; mask bool broadcastable to [B, H, L, L]. Returns [B, L, D]."""
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm1")(x)
        h = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout_rate=self.dropout_rate,
            decode=self.decode,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(h, mask=mask, deterministic=deterministic)
        x = x + h
        h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm2")(x)
        h = Mlp(self.mlp_dim, self.act, self.dropout_rate, self.dtype, self.param_dtype, name="mlp")(
            h, deterministic=deterministic
        )
        x = x + h
        return nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


class Transformer(nn.Module):
    """A stack of :class:`TransformerBlock` s named ``layers_0 .. layers_{n-1}``.

    Attributes:
      num_layers: depth; remat: rematerialise each block in the backward pass.
      Other fields as in :class:`TransformerBlock`.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    act: str = "gelu"
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    decode: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
        """Args: x [B, L, D]; mask bool broadcastable to [B, H, L, L]. Returns [B, L, D]."""
        block_cls = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
        for i in range(self.num_layers):
            x = block_cls(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                mlp_dim=self.mlp_dim,
                act=self.act,
                layer_norm_eps=self.layer_norm_eps,
                dropout_rate=self.dropout_rate,
                decode=self.decode,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )(x, mask, deterministic)
        return x
