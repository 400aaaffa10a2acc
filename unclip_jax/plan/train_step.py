"""The plan of one experiment's train step on a TPU slice: bytes per chip, FLOPs, a roofline step time.

:func:`plan_train` builds exactly what ``unclip train`` builds — the experiment's mesh and logical rules
(:mod:`unclip_jax.parallel`) over the slice's devices, the task, the optimiser, the abstract sharded state
(:func:`unclip_jax.train.loop.abstract_state`) and the loop's own ``train_step``
(:func:`~unclip_jax.train.loop.make_train_step`, remat and gradient accumulation included) — with abstract inputs
only, and compiles it with :func:`~unclip_jax.train.loop.compile_train_step` for the TPU (libtpu's compiler; no TPU
needed). From the result:

- **bytes per chip** of the parameters, optimiser state, EMA and batch, from their shardings; the compiled
  program's argument / output / alias / temp bytes (``memory_analysis``); whether the total fits the chip's HBM
  with 10% headroom;
- **the fsdp bound**: parameters + optimiser + EMA per chip must be at most 1.1 x total / (fsdp x tensor), else a
  large array is replicated by accident (the largest replicated ones are listed);
- **FLOPs and bytes accessed per chip per step** (``cost_analysis``), a roofline step time from the chip's
  published peaks (:mod:`unclip_jax.chips`) and the days to ``total_steps`` at a stated model-FLOPs
  utilisation (or at the roofline, when the step is memory-bound even at full bandwidth). XLA counts a loop body once, so with gradient accumulation the FLOPs of one microbatch's forward
  and backward are counted once; the plan scales them by the accumulation count. XLA's FLOPs are the
  program's: with remat they include the recomputed forward, so the days quoted at an MFU are the days at that
  utilisation of the FLOPs the chip actually executes.

These are compile-time estimates, not measured runs.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from unclip_jax import parallel
from unclip_jax.chips import GIB, Chip
from unclip_jax.plan import batches
from unclip_jax.plan.topology import PlanError, compile_within_hbm, device_grid_shape, topology_devices

HEADROOM = 0.10  # fits = used <= (1 - HEADROOM) x HBM
FSDP_SLACK = 1.10  # per-chip state <= FSDP_SLACK x total / (fsdp x tensor)
DEFAULT_MFU = 0.40  # model-FLOPs utilisation the days are quoted at


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def tree_bytes(abstract: Any, shardings: Any = None) -> tuple[int, int]:
    """(global bytes, bytes per device) of a tree of arrays / ShapeDtypeStructs under ``shardings``."""
    leaves = jax.tree.leaves(abstract)
    shards = jax.tree.leaves(shardings) if shardings is not None else [getattr(x, "sharding", None) for x in leaves]
    total = per_device = 0
    for x, s in zip(leaves, shards, strict=True):
        total += _nbytes(x.shape, x.dtype)
        per_device += _nbytes(s.shard_shape(x.shape) if s is not None else x.shape, x.dtype)
    return total, per_device


def replicated_leaves(abstract: Any, shardings: Any, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` largest leaves that are not split at all (path, shape, bytes)."""
    rows = []
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    for (path, x), s in zip(flat, jax.tree.leaves(shardings), strict=True):
        if s.shard_shape(x.shape) == tuple(x.shape) and s.num_devices > 1:
            rows.append(
                {"path": jax.tree_util.keystr(path), "shape": list(x.shape), "bytes": _nbytes(x.shape, x.dtype)}
            )
    return sorted(rows, key=lambda r: -r["bytes"])[:top]


def xla_cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled program (flops, bytes accessed, ...) as a dict; {} without a cost model."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without a cost model
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def memory_report(compiled: Any) -> dict[str, int]:
    """``compiled.memory_analysis()`` per device as ints, with ``used`` = argument + output - alias + temp + code."""
    m = compiled.memory_analysis()
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["used"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float]:
    """Step-time lower bounds of one chip: compute-bound, memory-bound and their max (seconds)."""
    t_compute = flops / (chip.bf16_tflops * 1e12)
    t_memory = bytes_accessed / (chip.hbm_gbps * 1e9)
    return {"compute_s": t_compute, "memory_s": t_memory, "step_s": max(t_compute, t_memory)}


def _spec_str(spec: Any) -> str:
    return str(tuple(spec)) if spec is not None else "()"


@dataclasses.dataclass
class Layout:
    """An experiment laid out on a slice, before compiling: mesh, rules, task, abstract sharded state and batch."""

    config: Any
    topology: str
    chip: Chip
    devices: list[Any]
    mesh: Any
    rules: Any
    task: Any
    tx: Any
    schedule: Any
    abstract: Any  # unboxed abstract TrainState (no shardings)
    shardings: Any  # its NamedShardings
    state: Any  # ShapeDtypeStructs with shardings
    batch: dict[str, jax.ShapeDtypeStruct]
    stand_ins: list[str]

    def bytes(self) -> dict[str, tuple[int, int]]:
        """``{part: (global bytes, bytes per chip)}`` of params, opt_state, ema, extra and batch."""
        s = self.state
        return {
            "params": tree_bytes(s.params),
            "opt_state": tree_bytes(s.opt_state),
            "ema": tree_bytes(s.ema_params),
            "extra": tree_bytes(s.extra),
            "batch": tree_bytes(self.batch),
        }

    def fsdp_check(self) -> dict[str, Any]:
        """Parameters + optimiser + EMA per chip against ``FSDP_SLACK x total / (fsdp x tensor)``."""
        parts = self.bytes()
        ways = int(self.mesh.shape["fsdp"]) * int(self.mesh.shape["tensor"])
        total = sum(parts[k][0] for k in ("params", "opt_state", "ema"))
        per_chip = sum(parts[k][1] for k in ("params", "opt_state", "ema"))
        bound = FSDP_SLACK * total / ways
        a, s = self.abstract, self.shardings
        return {
            "shard_ways": ways,
            "state_total": total,
            "state_per_chip": per_chip,
            "bound": bound,
            "ok": per_chip <= bound,
            "largest_replicated": replicated_leaves(
                {"params": a.params, "opt_state": a.opt_state, "ema_params": a.ema_params},
                {"params": s.params, "opt_state": s.opt_state, "ema_params": s.ema_params},
            ),
        }


def layout(config: Any, topology: str, devices: list[Any] | None = None, chip: Chip | None = None) -> Layout:
    """Lays ``config`` out on the slice ``topology``: what ``unclip train`` builds before it compiles.

    Args:
      config: an experiment config (``experiments/<stage>.py:<variant>``, overrides applied); its
        ``task.codec`` / ``task.null_caption`` may be left empty (zero-filled stand-ins are used).
      topology: e.g. ``"v5p:4x4x8"`` (128 chips).
      devices, chip: the slice's devices and chip (tests reuse them); default :func:`topology_devices`.

    Raises:
      PlanError: bad topology, missing libtpu, a mesh that does not fit the chips, a batch that does not divide.
    """
    if devices is None or chip is None:
        chip, devices = topology_devices(topology)
    from unclip_jax.train import loop, optim
    from unclip_jax.train.tasks import make_task

    try:
        mesh = parallel.make_mesh(config.mesh, devices)
        rules = parallel.logical_rules(config.mesh)
        parallel.batch_size_per_process(int(config.batch_size), mesh)
    except parallel.MeshError as e:
        raise PlanError(f"{topology} has {len(devices)} chips: {e}") from e
    with tempfile.TemporaryDirectory(prefix="unclip_plan_") as tmp:
        config = config.copy_and_resolve_references()
        stand_ins = batches.add_stand_in_files(config, tmp)
        task = make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, int(config.total_steps))
    batch = batches.abstract_batch(config, task.module, parallel.batch_sharding(mesh))
    abstract, shardings = loop.abstract_state(task, tx, batch, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return Layout(
        config=config,
        topology=topology,
        chip=chip,
        devices=list(devices),
        mesh=mesh,
        rules=rules,
        task=task,
        tx=tx,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        state=state,
        batch=batch,
        stand_ins=stand_ins,
    )


def compile_layout(lay: Layout, compiler_options: Mapping[str, Any] | None = None) -> Any:
    """The loop's own train step of ``lay`` (remat, gradient accumulation, EMA), compiled for the slice."""
    from unclip_jax.train import loop

    config = lay.config
    train_step = loop.make_train_step(
        lay.task,
        lay.tx,
        lay.schedule,
        base_rng=np.zeros((2,), np.uint32),
        ema_decay=float(config.ema.decay),
        ema_warmup=bool(config.ema.warmup),
        grad_accum_steps=int(config.optim.grad_accum_steps),
    )
    options = dict(compiler_options) if compiler_options else None
    return compile_within_hbm(
        lambda: loop.compile_train_step(train_step, lay.state, lay.batch, lay.shardings, lay.mesh, lay.rules, options),
        f"the train step on {lay.topology}",
    )


def describe_layout(lay: Layout) -> dict[str, Any]:
    """The JSON-able part of a plan known before compiling: slice, mesh, settings, bytes from the shardings."""
    config, parts = lay.config, lay.bytes()
    return {
        "kind": "train",
        "compiled": False,
        "task": config.task.name,
        "variant": config.model.variant,
        "topology": lay.topology,
        "chip": lay.chip.name,
        "device_kind": lay.devices[0].device_kind,
        "chips": len(lay.devices),
        "chip_grid": list(device_grid_shape(lay.devices)),
        "mesh": {k: int(v) for k, v in lay.mesh.shape.items()},
        "rules": config.mesh.rules,
        "rules_table": [[n, t if isinstance(t, str) or t is None else list(t)] for n, t in lay.rules],
        "batch_size": int(config.batch_size),
        "grad_accum_steps": int(config.optim.grad_accum_steps),
        "remat": bool(config.model.remat),
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "parameters": sum(int(math.prod(x.shape)) for x in jax.tree.leaves(lay.abstract.params)),
        "stand_ins": lay.stand_ins,
        "bytes_total": {k: v[0] for k, v in parts.items()},
        "bytes_per_chip": {k: v[1] for k, v in parts.items()},
        "batch_specs": {k: _spec_str(v.sharding.spec) for k, v in lay.batch.items()},
        "hbm_bytes": lay.chip.hbm_bytes,
        "hbm_gib": lay.chip.hbm_gib,
        "fsdp_check": lay.fsdp_check(),
        "total_steps": int(config.total_steps),
    }


def describe_compiled(compiled: Any, lay: Layout, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """The compiled program's part of a plan: memory vs HBM, FLOPs and bytes per chip, roofline, days."""
    chip = lay.chip
    memory = memory_report(compiled)
    cost = xla_cost(compiled)
    accum = int(lay.config.optim.grad_accum_steps)
    # XLA's cost model counts a while-loop body once: the accumulation scan runs it `accum` times (the optimiser
    # update outside the loop is then counted `accum` times too; it is small next to forward and backward).
    flops = float(cost.get("flops", 0.0)) * accum
    bytes_accessed = float(cost.get("bytes accessed", 0.0)) * accum
    roof = roofline(flops, bytes_accessed, chip)
    # At the stated MFU, but never faster than the roofline (memory-bound steps: the upsamplers).
    step_at_mfu = max(flops / (chip.bf16_tflops * 1e12 * mfu), roof["step_s"]) if flops else float("nan")
    total_steps = int(lay.config.total_steps)
    return {
        "compiled": True,
        "memory": memory,
        "fits": memory["used"] <= (1.0 - HEADROOM) * chip.hbm_bytes,
        "headroom": 1.0 - memory["used"] / chip.hbm_bytes,
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": bytes_accessed,
        "xla_cost": {k: float(v) for k, v in cost.items() if k in ("flops", "bytes accessed", "optimal_seconds")},
        "roofline": roof,
        "mfu": mfu,
        "step_s_at_mfu": step_at_mfu,
        "days_at_mfu": step_at_mfu * total_steps / 86400.0,
        "days_roofline": roof["step_s"] * total_steps / 86400.0,
    }


def plan_train(
    config: Any,
    topology: str,
    *,
    mfu: float = DEFAULT_MFU,
    compile: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
    devices: list[Any] | None = None,
    chip: Chip | None = None,
) -> dict[str, Any]:
    """Compiles ``config``'s train step for the TPU slice ``topology`` and reports what a chip holds and does.

    Args:
      config, topology, devices, chip: as :func:`layout`.
      mfu: the model-FLOPs utilisation at which ``days_at_mfu`` is quoted.
      compile: False reports the layout only (bytes from the shardings, the fsdp bound), in seconds.
      compiler_options: passed to XLA.

    Returns:
      a JSON-able dict (:func:`unclip_jax.plan.report.format_train` prints it).

    Raises:
      PlanError: as :func:`layout`.
    """
    lay = layout(config, topology, devices, chip)
    plan = describe_layout(lay)
    if compile:
        t0 = time.perf_counter()
        compiled = compile_layout(lay, compiler_options)
        plan.update(describe_compiled(compiled, lay, mfu), compile_s=time.perf_counter() - t0)
        plan["host_peak_gib"] = host_peak_gib()
    return plan


def host_peak_gib() -> float:
    """This process's peak resident memory in GiB so far (Linux ``ru_maxrss`` is in KiB): what compiling the
    program needed of the host, which on the paper's largest steps is tens of GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


__all__ = [
    "GIB",
    "Layout",
    "PlanError",
    "compile_layout",
    "describe_compiled",
    "describe_layout",
    "layout",
    "memory_report",
    "plan_train",
    "roofline",
]
