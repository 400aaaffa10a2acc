"""Device meshes, logical-axis rules, abstract-first sharded initialisation and multi-host helpers.

Model code names array dimensions with the logical axes of :mod:`unclip_jax.layers.axes`;
this module maps them onto a physical ``jax.sharding.Mesh`` with axes ``data``, ``fsdp``
and ``tensor`` (the rule set is a property of the experiment: ``config.mesh``). No pmap:
everything is ``jax.jit`` with ``NamedSharding`` in/out shardings (big_vision / maxtext
style).

Config (``config.mesh``, an ``ml_collections.ConfigDict``)::

    data: int = -1      # size of each mesh axis; exactly one may be -1 = "the rest of the devices"
    fsdp: int = 1
    tensor: int = 1
    rules: str = "data" # preset of unclip_jax.layers.axes ('data', 'fsdp', 'fsdp_tensor')
    rules_override: tuple = ()   # extra (logical, mesh axis | None) pairs, tried BEFORE the preset

Divisibility: a parameter dimension whose size does not divide the product of the mesh
axes its logical name maps to is **replicated along that dimension** (the rest of the
array stays sharded); :func:`logical_shardings` does this per leaf, so e.g. a 3-channel
``conv_out`` kernel or a scalar ``logit_scale`` simply stays replicated on an 8-way
``fsdp`` mesh. Batches, on the other hand, must divide ``data * fsdp`` (an error names
the field).

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize`` from
``config.distributed`` or the environment; each process loads its own share of the global
batch and :func:`global_batch` assembles a global ``jax.Array`` with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unclip_jax.layers import axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A mesh / sharding setting that cannot be honoured; the message names the config field."""


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves ``config.mesh.{data,fsdp,tensor}`` (one of them may be -1) against a device count.

    Args:
      mesh_cfg: object/mapping with ``data``, ``fsdp``, ``tensor`` ints (missing = data -1, others 1).
      num_devices: total number of devices (all processes).

    Returns:
      (data, fsdp, tensor) with product ``num_devices``.

    Raises:
      MeshError: naming the field(s) when the sizes do not fit the device count.
    """
    sizes = {"data": int(_get(mesh_cfg, "data", -1)), "fsdp": int(_get(mesh_cfg, "fsdp", 1))}
    sizes["tensor"] = int(_get(mesh_cfg, "tensor", 1))
    rest = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise MeshError(f"config.mesh.{k}={v}: expected a positive size or -1 (= the remaining devices)")
    if len(rest) > 1:
        raise MeshError(f"config.mesh: only one of {rest} may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % fixed:
            others = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items() if v != -1)
            raise MeshError(
                f"config.mesh.{rest[0]}=-1: {others} (product {fixed}) does not divide the {num_devices} devices"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {fixed} "
            f"but there are {num_devices} devices; set one of config.mesh.data/fsdp/tensor to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over ``devices`` (default: all).

    Devices are laid out with ``mesh_utils.create_device_mesh`` (topology-aware on TPU),
    falling back to a plain reshape where that is not possible (CPU, subsets).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - non-TPU topologies / device subsets
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_rules(mesh_cfg: Any = None) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of ``config.mesh``: ``rules_override`` pairs first, then the preset.

    Raises:
      MeshError: unknown preset, unknown logical name or mesh axis in ``rules_override``.
    """
    preset = _get(mesh_cfg, "rules", "data")
    try:
        base = axes.rules_for(preset)
    except ValueError as e:
        raise MeshError(str(e)) from e
    override = []
    for i, pair in enumerate(_get(mesh_cfg, "rules_override", ()) or ()):
        if len(pair) != 2:
            raise MeshError(f"config.mesh.rules_override[{i}]={pair!r}: expected (logical name, mesh axis or None)")
        name, target = pair[0], pair[1]
        if name not in axes.ALL:
            raise MeshError(
                f"config.mesh.rules_override[{i}]: unknown logical axis {name!r}; expected one of {axes.ALL}"
            )
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                raise MeshError(
                    f"config.mesh.rules_override[{i}]: unknown mesh axis {t!r}; expected one of {MESH_AXES}"
                )
        override.append((name, target if isinstance(target, str) or target is None else tuple(target)))
    return tuple(override) + tuple(base)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Activates ``mesh`` and logical ``rules`` so ``nn.with_logical_constraint`` in models takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicates every dimension of ``spec`` whose size does not divide its mesh axes' product."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = [e if e is not None and shape[i] % _axis_size(mesh, e) == 0 else None for i, e in enumerate(entries)]
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a (possibly abstract) tree whose leaves may be ``nn.Partitioned`` boxes.

    Logical names -> mesh axes via ``rules`` (``nn.logical_to_mesh_axes``); unboxed leaves
    and names without a rule are replicated; dimensions that do not divide their mesh axes
    fall back to replication (see the module docstring).

    Returns:
      a tree of ``NamedSharding`` with the structure of ``nn.unbox(boxed_tree)``.
    """

    def one(x: Any) -> NamedSharding:
        if _is_partitioned(x):
            value = x.value
            spec = nn.logical_to_mesh_axes(x.names, tuple(rules))
        else:
            value, spec = x, PartitionSpec()
        shape = getattr(value, "shape", ())
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))

    return jax.tree.map(one, boxed_tree, is_leaf=_is_partitioned)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
    """The share of ``config.batch_size`` each process loads.

    Raises:
      MeshError: when the batch does not divide ``data * fsdp`` or the process count.
    """
    shards = _axis_size(mesh, BATCH_AXES)
    if global_batch_size % shards:
        raise MeshError(f"config.batch_size={global_batch_size} does not divide over mesh data*fsdp = {shards} shards")
    if global_batch_size % jax.process_count():
        raise MeshError(f"config.batch_size={global_batch_size} does not divide over {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share (numpy, leading dim = per-process batch) into global arrays.

    Uses ``jax.make_array_from_process_local_data`` with :func:`batch_sharding`, so on one
    process this is a plain sharded ``device_put`` and on many each process contributes
    the rows it loaded (process ``i`` holds global rows ``[i*b, (i+1)*b)``).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(local_batch))


def abstract_init(
    init_fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]
) -> tuple[Any, Any]:
    """``jax.eval_shape(init_fn, *args)`` and the NamedShardings of its (unboxed) result.

    Returns:
      (abstract boxed tree, sharding tree of the unboxed structure).
    """
    with mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
    return abstract, logical_shardings(abstract, mesh, rules)


def initialize_distributed(dist_cfg: Any = None) -> bool:
    """Calls ``jax.distributed.initialize`` when a multi-process run is configured.

    Reads ``config.distributed.{coordinator_address, num_processes, process_id}`` or,
    when those are unset, the environment variables ``UNCLIP_COORDINATOR``,
    ``UNCLIP_NUM_PROCESSES`` and ``UNCLIP_PROCESS_ID``. On TPU pods / SLURM set
    ``config.distributed.auto=True`` to let JAX detect everything. Must run before any
    other JAX call. Returns True when it initialised.
    """
    addr = _get(dist_cfg, "coordinator_address", None) or os.environ.get("UNCLIP_COORDINATOR")
    num = _get(dist_cfg, "num_processes", None) or os.environ.get("UNCLIP_NUM_PROCESSES")
    pid = _get(dist_cfg, "process_id", None)
    if pid is None or pid == -1:
        pid = os.environ.get("UNCLIP_PROCESS_ID")
    if _get(dist_cfg, "auto", False):
        jax.distributed.initialize()
        return True
    if not addr:
        return False
    if num is None or pid is None:
        raise MeshError(
            "config.distributed.coordinator_address is set: also set config.distributed.num_processes and "
            "config.distributed.process_id (or UNCLIP_NUM_PROCESSES / UNCLIP_PROCESS_ID)"
        )
    jax.distributed.initialize(coordinator_address=addr, num_processes=int(num), process_id=int(pid))
    return True
