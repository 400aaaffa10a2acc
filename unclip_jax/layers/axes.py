"""The one list of logical axis names, and the default rule sets that map them to mesh axes.

Model code names the dimensions of every kernel with these logical names
(``nn.with_logical_partitioning``) and constrains activations at block boundaries
(``nn.with_logical_constraint``). Which mesh axis a logical name lands on is a property
of the experiment (``config.mesh.rules``), never of the model: see
``unclip_jax/parallel.py``. Mesh axes are ``data``, ``fsdp`` and ``tensor``.

Naming follows t5x/maxtext: activations use ``batch``/``length``/``embed``; kernels use
``embed``/``mlp``/``heads``/``kv``; convolutions use ``conv_in``/``conv_out`` for channels.
"""

from __future__ import annotations

# Activations.
BATCH = "batch"  # examples
LENGTH = "length"  # sequence positions
HEIGHT = "height"
WIDTH = "width"
ACT_EMBED = "act_embed"  # feature dim of activations (usually replicated)
ACT_HEADS = "act_heads"

# Parameters.
EMBED = "embed"  # model width
MLP = "mlp"  # hidden width of feed-forward layers
HEADS = "heads"  # attention heads (fused q/k/v output dim is heads*kv)
KV = "kv"  # per-head dim
VOCAB = "vocab"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
NORM = "norm"  # scales/biases of norms: always replicated
POSITION = "position"  # learned positional tables (rows)
KERNEL_H = "kernel_h"  # conv kernel height: never sharded
KERNEL_W = "kernel_w"  # conv kernel width: never sharded
# Conv kernels are named (KERNEL_H, KERNEL_W, CONV_IN, CONV_OUT): flax rejects a logical
# name that occurs twice in one array, so the two spatial dims have distinct names.

ALL = (
    BATCH,
    LENGTH,
    HEIGHT,
    WIDTH,
    ACT_EMBED,
    ACT_HEADS,
    EMBED,
    MLP,
    HEADS,
    KV,
    VOCAB,
    CONV_IN,
    CONV_OUT,
    NORM,
    POSITION,
    KERNEL_H,
    KERNEL_W,
)

# Rule sets: tuples of (logical name, mesh axis or tuple of mesh axes or None).
# Pure data parallel: parameters replicated, batch split over every mesh axis that
# carries data.
DATA_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = ((BATCH, ("data", "fsdp")),)
# ZeRO-3 style: parameters split along their width over ``fsdp``.
FSDP_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (CONV_OUT, "fsdp"),
    (VOCAB, "fsdp"),
)
# FSDP plus Megatron tensor parallelism over ``tensor``.
FSDP_TENSOR_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (ACT_HEADS, "tensor"),
    (CONV_IN, "tensor"),
    (CONV_OUT, "fsdp"),
    (VOCAB, "tensor"),
)

PRESETS = {"data": DATA_RULES, "fsdp": FSDP_RULES, "fsdp_tensor": FSDP_TENSOR_RULES}


def rules_for(preset: str) -> tuple:
    """Returns the logical-axis rule set of a named preset ('data', 'fsdp', 'fsdp_tensor')."""
    if preset not in PRESETS:
        raise ValueError(f"mesh.rules: unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]
