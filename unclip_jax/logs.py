"""Logging for the command-line programs (``unclip``, ``python -m unclip_jax.main``, ``data/*.py``, the demo).

One set-up for all of them: the package's progress at INFO with a timestamp, third-party chatter kept out (Orbax
logs every save step at INFO through absl; JAX's backend probe reports "Unable to initialize backend 'tpu'" on
every CPU start, which tells a newcomer nothing; on a machine without accelerators :func:`quiet_accelerator_probe`
keeps an installed libtpu from probing at all). A leaf module: it imports nothing of the package, so every part and
every script may use it.
"""

from __future__ import annotations

import glob
import logging
import os

QUIET_LOGGERS = {
    "absl": logging.WARNING,
    "jax._src.xla_bridge": logging.ERROR,
    "jax2onnx": logging.ERROR,  # reports every optional plugin it cannot import (equinox, dm_pix)
    "onnx_ir": logging.ERROR,
}


def quiet_accelerator_probe() -> None:
    """On a machine with no accelerator, tells JAX to use the CPU (``JAX_PLATFORMS=cpu``, unless set) so that an
    installed libtpu does not print its probe ("could not determine TPU accelerator type", "Unable to initialize
    backend 'tpu'") on every start. No accelerator: no Google PCI device (TPU chips, vendor 0x1ae0, as
    ``jax._src.hardware_utils`` counts them) and no NVIDIA / AMD device node. Must run before JAX starts a backend."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":
                    return
        except OSError:
            continue
    if any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")) or glob.glob("/dev/accel*"):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def setup_logging(level: int = logging.INFO) -> None:
    """Configures the root logger once (a program or test that configured it first keeps its handlers) and quiets
    the accelerator probe (:func:`quiet_accelerator_probe`; call this before JAX is imported)."""
    quiet_accelerator_probe()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines (tfds, clu writers)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("unclip_jax").setLevel(level)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)
