"""``unclip plan``: ahead-of-time compiles of the train steps for TPU slices, on a machine without a TPU.

- :mod:`unclip_jax.chips`: published per-chip peaks (bf16 FLOP/s, HBM bytes and bandwidth) of v4, v5e, v5p,
  v6e;
- :mod:`~unclip_jax.plan.topology`: a slice's devices from libtpu (``jax.experimental.topologies``);
- :mod:`~unclip_jax.plan.batches`: abstract global batches of each input pipeline;
- :mod:`~unclip_jax.plan.train_step`: the experiment laid out and its train step compiled for the slice: bytes per
  chip, the fsdp bound, FLOPs and a roofline step time;
- :mod:`~unclip_jax.plan.hlo`: which values of a compiled program still hold the whole batch on a chip;
- :mod:`~unclip_jax.plan.report`, :mod:`~unclip_jax.plan.commands`, :mod:`~unclip_jax.plan.table`: the report,
  the command and the README's "Scale out" table (``make plan``).
"""
