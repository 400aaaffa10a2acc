"""Logging for the command-line programs (``unclip``, ``python -m unclip_jax.main``, ``data/*.py``, the demo).

One set-up for all of them: the package's progress at INFO with a timestamp, third-party chatter kept out (Orbax
logs every save step at INFO through absl; JAX's backend probe reports "Unable to initialize backend 'tpu'" on
every CPU start, which tells a newcomer nothing). A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = {
    "absl": logging.WARNING,
    "jax._src.xla_bridge": logging.ERROR,
    "jax2onnx": logging.ERROR,  # reports every optional plugin it cannot import (equinox, dm_pix)
    "onnx_ir": logging.ERROR,
}


def setup_logging(level: int = logging.INFO) -> None:
    """Configures the root logger once (a program or test that configured it first keeps its handlers)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up lines (tfds, clu writers)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("unclip_jax").setLevel(level)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)
