"""Blockwise ("flash") attention: softmax(q k^T) v over blocks of queries, keeping only the log-sum-exp.

The forward pass computes one block of ``block_q`` queries at a time against all keys and saves, besides the
output, only each query's log-sum-exp of its logits; the backward pass recomputes each block's probabilities
from it (Dao et al. 2022, "FlashAttention", algorithm 2, with the query loop outermost and the full key range
per block, as the keys here are at most a few thousand). The saved state is [B, H, Lq] instead of the
[B, H, Lq, Lk] probabilities, and every logits-sized buffer is one block's, [B, H, block_q, Lk], which stays in
a CPU's cache where the whole matrix streams through memory several times (max, exp-sum, normalise, and the
backward's products) - the reason torch's CPU ``scaled_dot_product_attention`` is blocked as well.

Inputs are heads-major ([B, H, L, D], every contraction a batched matmul with its batch dimensions leading);
``q`` is pre-scaled; ``keep`` [B, Lk] is 1 where a key may be attended and 0 where its logit is replaced by
``mask_bias`` (the added-KV attention's padded context tokens). Logits, the softmax and its statistics are in
float32 whatever the inputs' dtype.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from unclip_jax.layers.attention import ATTENTION_SCOPE


def _blocks(t: jnp.ndarray, block_q: int) -> jnp.ndarray:
    """[B, H, Lq, ...] -> [Lq / block_q, B, H, block_q, ...] (the scan axis first)."""
    b, h, lq = t.shape[:3]
    t = t.reshape(b, h, lq // block_q, block_q, *t.shape[3:])
    return jnp.moveaxis(t, 2, 0)


def _unblocks(t: jnp.ndarray) -> jnp.ndarray:
    """Inverse of :func:`_blocks`."""
    nb, b, h, bq = t.shape[:4]
    return jnp.moveaxis(t, 0, 2).reshape(b, h, nb * bq, *t.shape[4:])


def _logits(qi: jnp.ndarray, k: jnp.ndarray, keep: jnp.ndarray, mask_bias: float) -> jnp.ndarray:
    s = jnp.einsum("bhqd,bhkd->bhqk", qi, k, preferred_element_type=jnp.float32)
    return jnp.where(keep[:, None, None, :] > 0.5, s, mask_bias)


def _forward(q, k, v, keep, block_q, mask_bias):
    def one(qi):
        s = _logits(qi, k, keep, mask_bias)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
        return o.astype(q.dtype), (m + jnp.log(denom))[..., 0]

    with jax.named_scope(ATTENTION_SCOPE):
        o, lse = jax.lax.map(one, _blocks(q, block_q))
        return _unblocks(o), _unblocks(lse)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, keep: jnp.ndarray, block_q: int, mask_bias: float
) -> jnp.ndarray:
    """softmax(q k^T, masked) v for pre-scaled heads-major ``q`` [B, H, Lq, D] and ``k``/``v`` [B, H, Lk, D],
    ``keep`` [B, Lk]; ``Lq`` must be a multiple of ``block_q``. Returns [B, H, Lq, D] in ``q``'s dtype."""
    if q.shape[2] % block_q:
        raise ValueError(f"blockwise_attention: {q.shape[2]} queries are not a multiple of block_q={block_q}")
    return _forward(q, k, v, keep, block_q, mask_bias)[0]


def _fwd(q, k, v, keep, block_q, mask_bias):
    o, lse = _forward(q, k, v, keep, block_q, mask_bias)
    return o, (q, k, v, keep, o, lse)


def _bwd(block_q, mask_bias, res, g):
    q, k, v, keep, o, lse = res
    with jax.named_scope(ATTENTION_SCOPE):
        # d softmax: ds = p * (dp - rowsum(dp * p)), and rowsum(dp * p) = rowsum(g * o) (the output's definition).
        delta = jnp.sum(o.astype(jnp.float32) * g.astype(jnp.float32), axis=-1)

        def body(carry, xs):
            dk, dv = carry
            qi, gi, lse_i, delta_i = xs
            p = jnp.exp(_logits(qi, k, keep, mask_bias) - lse_i[..., None])
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p.astype(gi.dtype), gi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhqd,bhkd->bhqk", gi, v, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
            dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            return (dk, dv), dq.astype(q.dtype)

        zeros = jnp.zeros(k.shape, jnp.float32)
        xs = (_blocks(q, block_q), _blocks(g, block_q), _blocks(lse, block_q), _blocks(delta, block_q))
        (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
    return _unblocks(dq), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(keep)


blockwise_attention.defvjp(_fwd, _bwd)
