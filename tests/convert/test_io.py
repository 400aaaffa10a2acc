"""Every folder writer is atomic and leaves files as any tool would (the umask's permissions)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from unclip_jax.convert import io
from unclip_jax.convert.native import save_native
from unclip_jax.models import prior


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_native_export_honours_the_umask_and_replaces_atomically(tmp_path):
    module = prior.build("test")
    variables = {"params": {"w": np.ones((2, 2), np.float32)}}
    for _ in range(2):  # the second write replaces the first
        folder = save_native(module, variables, tmp_path / "ema")
    mode = 0o777 & ~_umask()
    assert os.stat(folder).st_mode & 0o777 == mode
    assert all(os.stat(p).st_mode & 0o777 == mode & 0o666 for p in folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no .tmp-/.old- folder left behind


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.staged_folder(tmp_path / "x") as tmp:
            (tmp / "half.bin").write_bytes(b"12")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
