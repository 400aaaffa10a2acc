"""Every parameter of every network carries logical axis names from the one axes module (issues 3 and 4).

Checked on the abstract init (``jax.eval_shape``: nothing is computed) of each model's ``test`` variant, so a new
kernel added without ``nn.with_logical_partitioning`` fails here before it silently replicates on a pod.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from unclip_jax.layers import axes
from unclip_jax.models import ar_prior, clip, decoder, inception, prior, upsampler


def _prior():
    m = prior.build("test")
    return m, (), prior.example_inputs(m)


def _ar_prior():
    m = ar_prior.build("test")
    return m, (), ar_prior.example_inputs(m)


def _clip():
    m = clip.build("test")
    size = clip.VARIANTS["test"]["vision"]["image_size"]
    return m, (jnp.zeros((1, 77), jnp.int32), jnp.zeros((1, size, size, 3))), {}


def _decoder():
    m = decoder.build("test")
    d = m.clip_embeddings_dim
    return (
        m,
        (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), jnp.zeros((1, d)), jnp.zeros((1, d)), jnp.zeros((1, 7, d))),
        {},
    )


def _upsampler():
    m = upsampler.build("test")
    return m, (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)), jnp.zeros((1, 32, 32, 3))), {}


def _inception():
    m = inception.InceptionV3()
    return m, (jnp.zeros((1, 299, 299, 3)),), {}


@pytest.mark.parametrize("make", [_prior, _ar_prior, _clip, _decoder, _upsampler, _inception], ids=lambda f: f.__name__)
def test_every_param_has_logical_axes(make):
    module, args, kwargs = make()
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unannotated = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[
            0
        ]
        if not isinstance(leaf, nn.Partitioned)
    ]
    assert leaves and not unannotated, f"{type(module).__name__}: no logical axes on {unannotated[:10]}"
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim, leaf.names
        assert all(name is None or name in axes.ALL for name in leaf.names), leaf.names
