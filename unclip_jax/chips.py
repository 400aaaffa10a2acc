"""Published per-chip peaks of Cloud TPU generations: the roofline of :mod:`unclip_jax.plan` and the MFU of the train loop.

Numbers are Google's "key specifications" tables, per chip (v4 and v5p chips are two TensorCores run as one
"megacore" device, as JAX uses them):

- v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1,200 GB/s
- v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s
- v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s
- v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GiB HBM, 1,640 GB/s

The pages write "GB" for the capacities; the plan counts them as GiB (what the chips hold) and asks for 10%
headroom below them, which also covers what the runtime reserves for itself.
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip peaks.

    Attributes:
      name: the topology prefix (``v5p`` in ``v5p:4x4x8``).
      device_kind: what ``jax.Device.device_kind`` says for it.
      bf16_tflops: peak dense bf16 matmul throughput, TFLOP/s.
      hbm_gib: HBM capacity, GiB.
      hbm_gbps: HBM bandwidth, GB/s (1e9 bytes).
      megacore: whether JAX drives the chip's two TensorCores as one device.
    """

    name: str
    device_kind: str
    bf16_tflops: float
    hbm_gib: float
    hbm_gbps: float
    megacore: bool = False

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GIB)


CHIPS: tuple[Chip, ...] = (
    Chip("v4", "TPU v4", 275.0, 32.0, 1200.0, megacore=True),
    Chip("v5e", "TPU v5 lite", 197.0, 16.0, 819.0),
    Chip("v5p", "TPU v5", 459.0, 95.0, 2765.0, megacore=True),
    Chip("v6e", "TPU v6 lite", 918.0, 32.0, 1640.0),
)


def chip_named(name: str) -> Chip | None:
    """The chip of a topology prefix (``v5p``; ``v5litepod`` = ``v5e``), None when unknown."""
    name = {"v5litepod": "v5e", "v6litepod": "v6e"}.get(name.lower(), name.lower())
    return next((c for c in CHIPS if c.name == name), None)


def chip_of_device_kind(device_kind: str) -> Chip | None:
    """The chip whose ``device_kind`` this is (``"TPU v5 lite"`` -> v5e), None when unknown."""
    return next((c for c in CHIPS if c.device_kind == device_kind), None)
