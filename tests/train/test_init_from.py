"""Fine-tuning: ``config.init_from`` starts a run from a native folder's weights (e.g. imported Karlo weights)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from tests.train import test_data as data
from unclip_jax.convert import native
from unclip_jax.train import loop
from unclip_jax.train.tasks import make_task


def _config(**overrides):
    # lr 0: one step leaves params (and so the EMA) exactly where init_from put them.
    kw = {"total_steps": 1, "log_every": 1, "checkpoint.every": 1, "checkpoint.async_save": False, "optim.lr": 0.0}
    kw.update(overrides)
    return data.experiment("prior", **kw)


def test_run_starts_from_the_folder(tmp_path):
    config = _config()
    task = make_task(config)
    batch = data.first_batch(config)
    variables = jax.jit(task.init)(jax.random.key(42), batch)  # another seed than the run's own init
    variables = jax.tree.map(lambda x: np.asarray(x) + 0.25, jax.device_get(variables))
    native.save_native(task.module, variables, tmp_path / "init")
    config.init_from = str(tmp_path / "init")
    result = loop.train_and_evaluate(config, str(tmp_path / "wd"))
    _, exported = native.load_native(os.path.join(tmp_path / "wd", "export", "ema"))
    for coll in ("params", "stats"):
        got = jax.tree.leaves(jax.device_get(exported[coll]))
        want = jax.tree.leaves(jax.device_get(variables[coll]))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)
    assert result.step == 1


def test_wrong_variant_is_an_error_naming_the_key(tmp_path):
    config = _config()
    task = make_task(config)
    variables = jax.device_get(jax.jit(task.init)(jax.random.key(0), data.first_batch(config)))
    variables["params"] = dict(variables["params"])
    name = sorted(variables["params"])[0]
    del variables["params"][name]
    native.save_native(task.module, variables, tmp_path / "bad")
    config.init_from = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=rf"config\.init_from=.*bad.*missing \['{name}"):
        loop.train_and_evaluate(config, str(tmp_path / "wd"))
