"""The training state: step, params, EMA params, optimiser state (and non-trained variables).

Parameters are stored unboxed (plain arrays); their shardings come from the boxed
abstract init (:func:`unclip_jax.parallel.logical_shardings`). The EMA copy and the
optimiser moments inherit each parameter's sharding, so ZeRO-3 style ``fsdp`` rules
shard all three.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

# The name scope of the EMA update in the compiled program's op names (the bench's op-by-op profile).
EMA_SCOPE = "ema_update"


@flax.struct.dataclass
class TrainState:
    """Pure pytree state of one training run.

    Attributes:
      step: int32 scalar, number of optimiser updates done.
      params: trainable parameters (the ``params`` collection, unboxed).
      ema_params: exponential moving average of ``params`` (what is sampled and exported).
      opt_state: optax state.
      extra: other variable collections the model reads but the optimiser never touches
        (e.g. the prior's ``stats``: clip_mean / clip_std); a dict, possibly empty.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    extra: Any


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` (in the EMA's dtype, float32 for float32 params)."""
    with jax.named_scope(EMA_SCOPE):
        return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay at ``step``; with ``warmup`` it ramps as ``min(decay, (1 + n) / (10 + n))`` (tf / guided-diffusion)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))
