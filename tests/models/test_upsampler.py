"""The super-resolution U-Net (models/upsampler.py): parity with diffusers UNet2DModel, any-size inputs,
bf16, and parameter counts of the Karlo / paper variants."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_decoder import random_params
from unclip_jax.convert import upsampler as cu
from unclip_jax.models import unet, upsampler


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_is_the_unet_with_its_own_fields():
    # Native folders record the class path and these constructor fields in config.json.
    assert issubclass(upsampler.SuperResUNet, unet.UNetModel)
    assert upsampler.SuperResUNet.__module__ == "unclip_jax.models.upsampler"
    fields = {f.name for f in dataclasses.fields(upsampler.SuperResUNet)} - {"parent", "name"}
    assert fields == {f.name for f in dataclasses.fields(unet.UNetFields)} - {"parent", "name"}
    assert fields == {
        *("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks"),
        *("use_scale_shift_norm", "time_embed_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos"),
        *("freq_shift", "dropout", "sample_size", "remat", "dtype", "param_dtype"),
    }
    m = upsampler.SuperResUNet()
    assert (m.in_channels, m.out_channels, m.use_scale_shift_norm, m.sample_size) == (6, 3, False, 256)
    assert m.attention_head_dim is None and not any(m.level_attends(i) for i in range(4))


def test_any_size_low_res_concat_and_bf16():
    m = upsampler.build("test")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 12, 3)), jnp.float32)
    low = jnp.asarray(rng.standard_normal((2, 8, 12, 3)), jnp.float32)
    t = jnp.array([3, 900])
    params = random_params(m, jnp.concatenate([x, low], -1), t)
    apply = jax.jit(m.apply)
    out = apply(params, x, t, low)
    assert out.shape == (2, 8, 12, 3)
    np.testing.assert_array_equal(out, apply(params, jnp.concatenate([x, low], -1), t))
    # A crop-sized model runs unchanged at full size (fully convolutional); sizes must divide by 2.
    full = apply(params, jnp.tile(x, (1, 2, 2, 1)), t, jnp.tile(low, (1, 2, 2, 1)))
    assert full.shape == (2, 16, 24, 3) and bool(jnp.isfinite(full).all())
    with pytest.raises(ValueError, match="multiples of 2"):
        m.apply(params, x[:, :7], t, low[:, :7])
    out16 = jax.jit(upsampler.build("test", dtype=jnp.bfloat16).apply)(params, x, t, low)
    assert out16.dtype == jnp.bfloat16
    err = float(jnp.abs(out16.astype(jnp.float32) - out).max())
    assert err < 0.05 * float(jnp.abs(out).max()), err


# Parity configurations derived from the 'test' variant: block channels, blocks per level, time conditioning,
# image size and batch vary.
PARITY = {
    "A": (dict(model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=2), dict(b=2, size=(24, 40))),
    "B": (
        dict(model_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1, use_scale_shift_norm=True, norm_num_groups=4),
        dict(b=3, size=(16, 16)),
    ),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(PARITY))
def test_matches_diffusers(torch_threads, tmp_path, name):
    torch = torch_threads
    from diffusers import UNet2DModel

    overrides, shape = PARITY[name]
    m = upsampler.build("test", **overrides)
    ref = UNet2DModel.from_config(cu.config_from_module(m))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.eval().save_pretrained(tmp_path / "super_res_last")
    module, variables = cu.load_upsampler(tmp_path, "super_res_last")
    assert module == m
    rng = np.random.default_rng(7)
    x = rng.standard_normal((shape["b"], *shape["size"], 6)).astype(np.float32)
    t = rng.integers(0, 1000, shape["b"])
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(module.apply)(variables, x, t))
    diff = float(np.abs(got - want).max())
    print(f"upsampler parity {name}: max abs diff {diff:.2e} (output max {np.abs(want).max():.2f})")
    assert diff <= 1e-4, diff


@pytest.mark.torch
def test_parameter_counts(torch_threads):
    torch = torch_threads
    from diffusers import UNet2DModel

    counts = {}
    for variant in ("karlo", "paper", "paper_1024", "bench"):
        m = upsampler.build(variant)
        shapes = jax.eval_shape(lambda m=m: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 6)), jnp.zeros((1,))))
        counts[variant] = _count(nn.unbox(shapes)["params"])
        print(f"upsampler {variant}: {counts[variant] / 1e6:.1f}M parameters")
    cfg = cu.config_from_module(upsampler.build("karlo"))
    assert cfg["block_out_channels"] == [320, 640, 960, 1280] and cfg["layers_per_block"] == 3
    assert cfg["resnet_time_scale_shift"] == "default" and cfg["add_attention"] is False
    with torch.device("meta"):
        ref = sum(p.numel() for p in UNet2DModel.from_config(cfg).parameters())
    assert counts["karlo"] == ref
    assert 0.65e9 < counts["karlo"] < 0.75e9  # Karlo's 700M upsampler
    assert 0.65e9 < counts["paper"] < 0.75e9  # appendix C: 700M (64->256)
    assert 0.25e9 < counts["paper_1024"] < 0.35e9  # appendix C: 300M (256->1024)
