"""The optimiser from ``config.optim``: AdamW, warm-up + schedule, global-norm clipping.

Fields (``config.optim``; paper appendix C table 3 gives lr / betas / eps / weight decay
per stage)::

    lr: float                  peak learning rate
    b1, b2, eps: float         Adam moments
    weight_decay: float        decoupled (AdamW); applied to kernels/embeddings only (ndim >= 2)
    warmup_steps: int          linear warm-up from 0
    schedule: str              'constant' | 'cosine' | 'linear' decay after the warm-up
    decay_steps: int           length of the decay (0 = config.total_steps - warmup_steps)
    end_lr_factor: float       final lr = end_lr_factor * lr for cosine / linear
    grad_clip_norm: float      global-norm clipping (0 = off)
    grad_accum_steps: int      microbatches per update (the train step scans over them)
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")
# The name scope of the optimiser update in the compiled program's op names (the bench's op-by-op profile).
OPTIMIZER_SCOPE = "optimizer_update"


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Warm-up followed by the configured schedule.

    Raises:
      ValueError: naming ``config.optim.schedule`` when unknown.
    """
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.warmup_steps)
    kind = optim_cfg.schedule
    decay = int(optim_cfg.decay_steps) or max(1, int(total_steps) - warmup)
    end = lr * float(optim_cfg.end_lr_factor)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(lr, end, decay)
    else:
        raise ValueError(f"config.optim.schedule={kind!r}: expected one of {SCHEDULES}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices / conv kernels / embeddings (ndim >= 2)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with clipping and the schedule of ``config.optim``.

    Returns:
      (transformation, learning-rate schedule) -- the schedule is also logged as ``train/lr``.
    """
    schedule = make_schedule(optim_cfg, total_steps)
    chain = []
    clip = float(optim_cfg.grad_clip_norm)
    if clip > 0:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(
        optax.adamw(
            schedule,
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=float(optim_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return named(optax.chain(*chain), OPTIMIZER_SCOPE), schedule


def named(tx: optax.GradientTransformation, scope: str) -> optax.GradientTransformation:
    """``tx`` with its ``update`` traced under ``jax.named_scope(scope)`` (same state, same numbers)."""

    def update(updates, state, params=None):
        with jax.named_scope(scope):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)
