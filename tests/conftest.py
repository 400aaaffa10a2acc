"""Shared test set-up: the CPU backend with 8 fake devices, float32 matmuls, deterministic threads.

Every test process sees 8 CPU devices so that sharding tests can build real meshes;
computations that are not sharded run on device 0 as usual.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CPU backend only: with libtpu installed (the tpu extra, for `unclip plan`), JAX would otherwise load it in
# every test process (memory, a lock file, start-up noise). The plan tests compile for TPU topologies regardless.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs (still part of `make test`)")
    config.addinivalue_line("markers", "torch: compares against the PyTorch reference implementations")


@pytest.fixture(scope="session")
def torch_threads():
    """Imports torch with 1 thread and a fixed seed (PyTorch references in parity tests)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return torch
