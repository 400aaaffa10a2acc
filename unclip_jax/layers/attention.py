"""Multi-head dot-product attention shared by the prior, CLIP and the AR prior.

The numerics follow the PyTorch references the weights come from: separate q/k/v/out
projections with biases (diffusers ``Attention`` with ``AttnProcessor``; transformers
``CLIPAttention``), logits scaled by ``head_dim ** -0.5`` and a softmax over keys
(Vaswani et al. 2017, "Attention is all you need", section 3.2.1).

Masks are boolean ``[B, 1 or heads, Lq, Lk]`` (True = may attend); :func:`make_causal_mask`
and :func:`make_padding_mask` build them and :func:`combine_masks` intersects them.
Masked logits are set to the most negative finite value of the compute dtype before the
softmax, which matches the references' additive ``-10000`` / ``finfo.min`` masks to float32
precision for every query row that has at least one visible key.

Incremental decoding (``decode=True``) keeps a key/value cache in the ``cache`` variable
collection, following ``flax.linen.MultiHeadDotProductAttention``: initialise it with
``module.init(..., decode=True)`` on a full-length input, then call one position at a time
with ``mutable=["cache"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax.layers import axes

Dtype = Any
Initializer = Callable[..., jax.Array]


# The name scope of the attention core (q k^T, softmax, p v and their gradients) in the compiled program's op names:
# what the bench's op-by-op profile counts as attention (:mod:`unclip_jax.bench.profile`).
ATTENTION_SCOPE = "attention_core"
# Whether :func:`dot_product_attention` contracts heads-major ([B, H, L, D]: batch dimensions leading in both
# contractions, as XLA:CPU's dot emitters want them; the default) or in the [B, L, H, D] layout; the last entry rules.
HEADS_MAJOR = [True]


def make_causal_mask(length: int) -> jnp.ndarray:
    """Lower-triangular mask: query i sees keys 0..i (GPT / CLIP text tower / prior).

    Returns:
      [1, 1, length, length] bool.
    """
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def make_padding_mask(key_mask: jnp.ndarray) -> jnp.ndarray:
    """Key padding mask from per-token validity.

    Args:
      key_mask: [B, Lk] bool (True = real token).

    Returns:
      [B, 1, 1, Lk] bool.
    """
    return key_mask.astype(bool)[:, None, None, :]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    """Logical AND of broadcastable boolean masks; ``None`` entries are ignored."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0].astype(bool)
    for m in masks[1:]:
        out = jnp.logical_and(out, m.astype(bool))
    return out


def dot_product_attention(
    query: jnp.ndarray,
    key: jnp.ndarray,
    value: jnp.ndarray,
    mask: jnp.ndarray | None = None,
    dtype: Dtype = jnp.float32,
) -> jnp.ndarray:
    """Scaled dot-product attention; the softmax is computed in float32.

    Args:
      query: [B, Lq, H, Dh].
      key: [B, Lk, H, Dh].
      value: [B, Lk, H, Dh].
      mask: optional bool, broadcastable to [B, H, Lq, Lk]; True = may attend.
      dtype: compute dtype of the output.

    Returns:
      [B, Lq, H, Dh].
    """
    with jax.named_scope(ATTENTION_SCOPE):
        scale = query.shape[-1] ** -0.5
        if HEADS_MAJOR[-1]:
            t = (0, 2, 1, 3)
            query, key, value = query.transpose(t), key.transpose(t), value.transpose(t)
            logits = jnp.einsum("bhqd,bhkd->bhqk", query, key).astype(jnp.float32) * scale
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        if HEADS_MAJOR[-1]:
            return jnp.einsum("bhqk,bhkd->bhqd", weights, value).transpose(t)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate q/k/v projections and an output projection.

    Parameter names: ``query``, ``key``, ``value``, ``out`` (each a Dense with kernel
    [in, out] and bias), the layout of diffusers ``to_q/to_k/to_v/to_out.0`` and of
    transformers ``q_proj/k_proj/v_proj/out_proj``.

    Attributes:
      num_heads: number of heads.
      head_dim: channels per head; the inner width is ``num_heads * head_dim``.
      out_features: output width (defaults to the input width).
      use_bias: biases on all four projections.
      dropout_rate: dropout on the output projection (diffusers ``to_out.1``).
      decode: use and update the ``cache`` collection (autoregressive sampling).
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    num_heads: int
    head_dim: int
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    def _dense(self, features: int, in_axis: str, out_axis: str, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, (in_axis, out_axis)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        inputs_q: jnp.ndarray,
        inputs_kv: jnp.ndarray | None = None,
        mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Attends ``inputs_q`` over ``inputs_kv`` (itself when None).

        Args:
          inputs_q: [B, Lq, D].
          inputs_kv: [B, Lk, Dkv] or None for self-attention.
          mask: bool broadcastable to [B, H, Lq, Lk] (True = may attend). In decode mode
            it is indexed by the cache: pass the full-length mask's row(s) [B, H, 1, Lmax]
            or None for causal-only.
          deterministic: disables dropout.

        Returns:
          [B, Lq, out_features or D].
        """
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        inner = self.num_heads * self.head_dim
        b, lq, d = inputs_q.shape
        q = self._dense(inner, axes.EMBED, axes.HEADS, "query")(inputs_q)
        k = self._dense(inner, axes.EMBED, axes.HEADS, "key")(inputs_kv)
        v = self._dense(inner, axes.EMBED, axes.HEADS, "value")(inputs_kv)
        q = q.reshape(b, lq, self.num_heads, self.head_dim)
        k = k.reshape(b, k.shape[1], self.num_heads, self.head_dim)
        v = v.reshape(b, v.shape[1], self.num_heads, self.head_dim)
        if self.decode:
            k, v, mask = self._update_cache(k, v, mask)
        x = dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        x = x.reshape(b, lq, inner)
        out = self._dense(self.out_features or d, axes.HEADS, axes.EMBED, "out")(x)
        return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)

    def _update_cache(self, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None):
        """KV-cache hook (flax ``MultiHeadDotProductAttention`` decode semantics).

        On init the cache is created with the full length of ``k``; afterwards each call
        writes its ``k``/``v`` (length 1) at ``cache_index`` and attends causally over the
        filled prefix.
        """
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not is_initialized:
            return k, v, mask
        max_length = cached_key.value.shape[1]
        if k.shape[1] != 1:
            raise ValueError(f"decode=True expects one position per call, got length {k.shape[1]}")
        i = cache_index.value
        key = jax.lax.dynamic_update_slice(cached_key.value, k, (0, i, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, i, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = i + 1
        visible = (jnp.arange(max_length) <= i)[None, None, None, :]
        return key, value, combine_masks(visible, mask)
