"""TPU topologies without a TPU: libtpu's ahead-of-time compiler behind ``jax.experimental.topologies``.

With ``libtpu`` installed (``pip install -e '.[tpu]'``; ``make install`` does it), XLA compiles for any TPU slice
on a CPU-only machine: ``get_topology_desc(platform="tpu", topology_name="v5p:4x4x8")`` describes the slice's
devices, a ``jax.sharding.Mesh`` over them shards a jitted function, and ``.lower(...).compile()`` runs the real TPU
compiler (MaxText's ``train_compile.py`` does the same). Nothing is executed; ``jax.devices()`` stays the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from unclip_jax.chips import CHIPS, Chip, chip_named, chip_of_device_kind

TOPOLOGY_RE = re.compile(r"^(?P<chip>[a-z0-9]+):(?P<shape>\d+(x\d+){1,2})$")
EXAMPLES = "v5p:2x2x1, v5p:4x4x8 (v5p-128 chips), v5e:16x16 (v5e-256), v4:4x4x8, v6e:16x16"
INSTALL_HINT = "pip install -e '.[tpu]' (or `make install`) installs libtpu==0.0.42.*, the TPU compiler"


class PlanError(ValueError):
    """A plan input that cannot be honoured; the one-line message says what to do."""


class DoesNotFit(PlanError):
    """XLA's TPU compiler refused the program because it needs more HBM than the chip has: a plan's verdict (the
    step does not fit), not a bad input. Its one-line message carries what XLA said it needs."""

    @classmethod
    def check(cls, error: BaseException, what: str) -> DoesNotFit | None:
        """The :class:`DoesNotFit` of an XLA ``RESOURCE_EXHAUSTED`` compile error for ``what``, else ``None``."""
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text or "memory" not in text.lower():
            return None
        detail = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text).strip()
        detail = detail.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
        return cls(f"{what} does not fit: XLA's TPU compiler says: {detail}")


def compile_within_hbm(compile_fn: Callable[[], Any], what: str) -> Any:
    """``compile_fn()``, with XLA's refusal for the chip's HBM raised as :class:`DoesNotFit` about ``what``."""
    try:
        return compile_fn()
    except Exception as e:  # XLA raises RESOURCE_EXHAUSTED as a plain runtime error
        verdict = DoesNotFit.check(e, what)
        if verdict is None:
            raise
        raise verdict from None


def libtpu_available() -> bool:
    """Whether the TPU compiler can be loaded (``TPU_LIBRARY_PATH`` or the ``libtpu`` package)."""
    path = os.environ.get("TPU_LIBRARY_PATH", "")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5p:4x4x8"`` -> (the v5p :class:`Chip`, (4, 4, 8)).

    Raises:
      PlanError: the name is not ``<chip>:<AxB[xC]>`` of a known chip.
    """
    m = TOPOLOGY_RE.match(name.strip().lower())
    chips = ", ".join(c.name for c in CHIPS)
    if not m:
        raise PlanError(f"--topology={name!r}: expected <chip>:<shape> with chip one of {chips}, e.g. {EXAMPLES}")
    chip = chip_named(m.group("chip"))
    if chip is None:
        raise PlanError(f"--topology={name!r}: unknown chip {m.group('chip')!r}; expected one of {chips}")
    return chip, tuple(int(s) for s in m.group("shape").split("x"))


def topology_devices(name: str) -> tuple[Chip, list[Any]]:
    """The devices (one per chip) of the TPU slice ``name``, for meshes and AOT compiles.

    Raises:
      PlanError: libtpu is missing, or the topology name / shape is not one libtpu knows.
    """
    chip, _ = parse_topology(name)
    if not libtpu_available():
        raise PlanError(f"libtpu is not installed, so there is no TPU compiler: {INSTALL_HINT}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
    # Any JAX process that started with libtpu installed holds libtpu's lockfile; compiling needs no TPU, so share.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if chip.name == "v4" else {}
    topology_name = f"{chip.name}:{name.split(':', 1)[1]}"
    try:
        devices = list(topologies.get_topology_desc(topology_name=topology_name, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad shapes as runtime errors
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology={name!r}: libtpu rejects it ({detail}); try e.g. {EXAMPLES}") from e
    kind = chip_of_device_kind(devices[0].device_kind)
    if kind is not None and kind.name != chip.name:
        raise PlanError(f"--topology={name!r}: libtpu describes {devices[0].device_kind!r} chips, not {chip.name}")
    return chip, devices


def device_grid_shape(devices: Sequence[Any]) -> tuple[int, ...]:
    """The physical chip grid of topology devices (max coordinate + 1 per axis), for the report."""
    coords = [getattr(d, "coords", None) for d in devices]
    if not coords or any(c is None for c in coords):
        return (len(devices),)
    return tuple(max(c[i] for c in coords) + 1 for i in range(len(coords[0])))
