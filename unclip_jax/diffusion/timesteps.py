"""Timestep sampling for training (guided-diffusion ``resample.py``, functional).

API (other modules code against these):
    * ``sample_timesteps(key, batch_size, num_timesteps) -> (t int32 [B], weights float32 [B])``: uniform, weights 1.
    * Importance sampling of the VLB terms (Improved DDPM Sec. 3.3, ``LossSecondMomentResampler``) as pure
      functions of an ``ImportanceState`` pytree: ``init_importance_state(T, history_per_term=10)``,
      ``importance_sample(key, state, batch_size, uniform_prob=0.001)`` (uniform until every t has a full history)
      and ``update_importance_state(state, t, losses)`` (feed it the per-example ``vb`` losses of all hosts).
      Multiply per-example losses by ``weights`` to keep the objective unbiased.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def sample_timesteps(key: jax.Array, batch_size: int, num_timesteps: int) -> tuple[jax.Array, jax.Array]:
    """Uniform t ~ U{0, .., T-1} (DDPM Algorithm 1).

    Returns:
        (t int32 ``[B]``, weights float32 ``[B]`` of ones).
    """
    t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
    return t, jnp.ones((batch_size,), jnp.float32)


class ImportanceState(NamedTuple):
    """Recent losses per timestep: ``history [T, K]`` and how many are filled, ``counts [T]``."""

    history: jax.Array
    counts: jax.Array


def init_importance_state(num_timesteps: int, history_per_term: int = 10) -> ImportanceState:
    """Empty loss history (guided-diffusion ``LossSecondMomentResampler.__init__``)."""
    return ImportanceState(
        jnp.zeros((num_timesteps, history_per_term), jnp.float32), jnp.zeros((num_timesteps,), jnp.int32)
    )


def importance_weights(state: ImportanceState, uniform_prob: float = 0.001) -> jax.Array:
    """p(t) proportional to sqrt(E[L_t^2]) mixed with uniform (Improved DDPM eq. 18); uniform until warm."""
    num_timesteps, k = state.history.shape
    w = jnp.sqrt(jnp.mean(state.history**2, axis=-1))
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    w = w * (1.0 - uniform_prob) + uniform_prob / num_timesteps
    warm = jnp.all(state.counts >= k)
    return jnp.where(warm, w, jnp.full_like(w, 1.0 / num_timesteps))


def importance_sample(
    key: jax.Array, state: ImportanceState, batch_size: int, uniform_prob: float = 0.001
) -> tuple[jax.Array, jax.Array]:
    """Samples t ~ p(t) of `importance_weights`.

    Returns:
        (t int32 ``[B]``, weights ``1 / (T p(t))`` float32 ``[B]``).
    """
    p = importance_weights(state, uniform_prob)
    num_timesteps = p.shape[0]
    t = jax.random.choice(key, num_timesteps, (batch_size,), p=p).astype(jnp.int32)
    return t, (1.0 / (num_timesteps * p[t])).astype(jnp.float32)


def update_importance_state(state: ImportanceState, t: jax.Array, losses: jax.Array) -> ImportanceState:
    """Appends ``losses[i]`` to the history of ``t[i]`` in order, dropping the oldest when full."""
    k = state.history.shape[1]

    def body(i, st):
        history, counts = st
        ti, li = t[i], losses[i].astype(jnp.float32)
        row = history[ti]
        full = counts[ti] >= k
        shifted = jnp.concatenate([row[1:], li[None]])
        filled = row.at[jnp.minimum(counts[ti], k - 1)].set(li)
        history = history.at[ti].set(jnp.where(full, shifted, filled))
        counts = counts.at[ti].set(jnp.minimum(counts[ti] + 1, k))
        return ImportanceState(history, counts)

    return jax.lax.fori_loop(0, t.shape[0], body, state)
