"""Meshes, rules, divisibility fallback, and one train step on four 8-device meshes == one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train import test_data as data
from unclip_jax import parallel
from unclip_jax.train import loop, optim
from unclip_jax.train.tasks import make_task


def test_mesh_shape_resolves_rest_and_names_the_field():
    assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert parallel.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(parallel.MeshError, match=r"config\.mesh\.data=-1.*mesh\.fsdp=3"):
        parallel.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(parallel.MeshError, match=r"config\.mesh: data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8"):
        parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(parallel.MeshError, match="only one of"):
        parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(parallel.MeshError, match=r"config\.mesh\.tensor=0"):
        parallel.mesh_shape({"data": -1, "tensor": 0}, 8)


def test_rules_presets_and_overrides():
    rules = parallel.logical_rules({"rules": "fsdp", "rules_override": (("mlp", "tensor"),)})
    assert rules[0] == ("mlp", "tensor") and ("embed", "fsdp") in rules
    with pytest.raises(parallel.MeshError, match="unknown preset"):
        parallel.logical_rules({"rules": "zero3"})
    with pytest.raises(parallel.MeshError, match=r"rules_override\[0\]: unknown mesh axis 'model'"):
        parallel.logical_rules({"rules_override": (("mlp", "model"),)})


def test_indivisible_dimension_falls_back_to_replication():
    mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    assert parallel.fit_spec(P("fsdp", None), (16, 3), mesh) == P("fsdp")
    assert parallel.fit_spec(P(None, "fsdp"), (16, 3), mesh) == P()
    assert parallel.fit_spec(P(("data", "fsdp")), (12,), mesh) == P()
    with pytest.raises(parallel.MeshError, match=r"config\.batch_size=12 .*data\*fsdp = 8"):
        parallel.batch_size_per_process(12, mesh)


@pytest.fixture(scope="module")
def prior_setup():
    config = data.experiment("prior")
    return config, make_task(config), data.first_batch(config)


def _mesh(mesh_cfg, rules_name):
    mesh = parallel.make_mesh(mesh_cfg, devices=jax.devices()[: int(np.prod(list(mesh_cfg.values())))])
    return mesh, parallel.logical_rules({"rules": rules_name})


def _one_step(config, task, local_batch, mesh, rules, state=None):
    """One compiled train step on ``mesh``; ``state`` (host arrays) is placed onto the mesh's shardings."""
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = parallel.global_batch(local_batch, mesh)
    if state is None:  # abstract-first init straight into the shards
        state, shardings, _ = loop.init_state(task, tx, jax.random.PRNGKey(1), batch, mesh, rules)
    else:
        _, shardings = loop.abstract_state(task, tx, batch, mesh, rules)
        state = jax.device_put(state, shardings)
    initial = jax.device_get(state)
    step = loop.make_train_step(task, tx, schedule, base_rng=jax.random.PRNGKey(2), ema_decay=0.9)
    compiled = loop.compile_train_step(step, state, batch, shardings, mesh, rules)
    state, metrics = compiled(state, batch)
    return initial, state, jax.device_get(metrics)


@pytest.mark.slow
def test_same_step_on_every_mesh_as_on_one_device(prior_setup):
    config, task, batch = prior_setup
    initial, ref_state, ref_metrics = _one_step(
        config, task, batch, *_mesh({"data": 1, "fsdp": 1, "tensor": 1}, "data")
    )
    ref_params = jax.device_get(ref_state.params)
    cases = [((8, 1, 1), "data"), ((2, 4, 1), "fsdp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tensor")]
    for (d, f, t), rules in cases:
        mesh, rule_set = _mesh({"data": d, "fsdp": f, "tensor": t}, rules)
        _, state, metrics = _one_step(config, task, batch, mesh, rule_set, state=initial)
        np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-5, err_msg=str((d, f, t)))
        np.testing.assert_allclose(metrics["train/grad_norm"], ref_metrics["train/grad_norm"], rtol=1e-4)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=2e-6, rtol=1e-5), state.params, ref_params
        )
        # Really sharded: with fsdp (and tensor) the big kernels are split, and so are their Adam moments.
        shards = {
            "/".join(str(k.key) for k in path): (leaf.shape, leaf.addressable_shards[0].data.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        }
        split = {k: v for k, v in shards.items() if v[0] != v[1]}
        if f > 1:
            proj = shards["proj_in/kernel"]  # [embedding_dim, width] = (embed, mlp)
            assert proj[1] == (proj[0][0] // f, proj[0][1] // t), (d, f, t, proj)
            assert len(split) > len(shards) // 3, (d, f, t, len(split), len(shards))
        else:
            assert not split, split
