"""Inpainting through the cascade (pipeline/inpaint.py, issue 21): the unmasked pixels equal the source at the decoder's
size and after the upsampler, the masked region is generated, and ``unclip inpaint`` writes the image or fails in one
line (mask of another size, unreadable mask), with a documented 0.5 threshold for grey masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unclip_jax import cli
from unclip_jax.pipeline import StageSettings, testing
from unclip_jax.pipeline.images import from_uint8
from unclip_jax.pipeline.inpaint import prepare_inpaint_inputs
from unclip_jax.pipeline.program import stage_inpaint_inputs

SETTINGS = dict(prior=StageSettings(3), decoder=StageSettings(3, guidance_scale=4.0), super_res=StageSettings(2))
FAST = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2", "--decoder-guidance", "4"]
JUMPS = dict(jump_length=1, jump_n_sample=2)


@pytest.fixture(scope="module")
def pipe():
    return testing.random_pipeline("test", seed=4)


def _mask(size: int) -> np.ndarray:
    m = np.ones((size, size), np.float32)
    m[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0.0  # a square hole in the middle
    return m


def test_unmasked_pixels_equal_the_source_at_every_stage(pipe):
    rng = np.random.default_rng(0)
    source = from_uint8(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # the super-res output size
    mask = _mask(32)
    out = pipe.inpaint(source, mask, ["a red circle", "a blue square"], settings=SETTINGS, seed=1, **JUMPS)
    final, keep = out["images"], out["mask"][..., 0] >= 0.5
    assert final.shape == (2, 32, 32, 3) and out["decoder_images"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(final[keep], np.broadcast_to(source, final.shape)[keep])
    hole = ~keep
    assert np.abs(final[hole] - np.broadcast_to(source, final.shape)[hole]).mean() > 0.05  # generated, not copied
    # The decoder (16x16) keeps the source resized to its size, on the resized mask.
    known, m16 = stage_inpaint_inputs(dict(inpaint_image=out["source"], inpaint_mask=out["mask"]), 16)
    keep16 = np.asarray(m16[..., 0]) >= 0.5
    assert keep16.sum() and (~keep16).sum()
    np.testing.assert_allclose(out["decoder_images"][keep16], np.asarray(known)[keep16], atol=1e-6)


def test_decoder_only_and_the_model_method_needs_an_inpainting_decoder(pipe):
    rng = np.random.default_rng(1)
    source = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
    mask = _mask(16)
    s = dict(SETTINGS, decoder=StageSettings(4, guidance_scale=2.0))
    out = pipe.inpaint(source, mask, "a green triangle", settings=s, stop_after="decoder", jump_length=2,
                       jump_n_sample=3)  # fmt: skip
    keep = mask >= 0.5
    np.testing.assert_array_equal(out["images"][0][keep], source[keep])
    with pytest.raises(ValueError, match="needs GLIDE's inpainting decoder"):
        pipe.inpaint(source, mask, "x", method="model", stop_after="decoder")


def test_mask_checks_and_threshold():
    img = np.zeros((8, 8, 3), np.float32)
    grey = np.full((8, 8), 0.5, np.float32)
    grey[0, 0], grey[0, 1] = 0.49, 1.0
    image, mask = prepare_inpaint_inputs(img, grey, num_prompts=3)
    assert image.shape == (3, 8, 8, 3) and mask.shape == (3, 8, 8, 1)
    assert mask[0, 0, 0, 0] == 0.0 and mask[0, 0, 1, 0] == 1.0 and mask[0, 3, 3, 0] == 1.0  # >= 0.5 keeps
    with pytest.raises(ValueError, match="the mask is 4x4 but the image is 8x8"):
        prepare_inpaint_inputs(img, np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        prepare_inpaint_inputs(img, np.full((8, 8), 255.0))
    with pytest.raises(ValueError, match="square"):
        prepare_inpaint_inputs(np.zeros((8, 6, 3)), np.ones((8, 6)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("inpaint")
    testing.save_native_pipeline(pipe, root / "model")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray((_mask(32) * 255).astype(np.uint8)).save(root / "mask.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "small_mask.png")
    return root


def test_cli_writes_the_inpainted_image(model_dir, capsys):
    out = model_dir / "out" / "inpainted.png"
    argv = ["inpaint", str(model_dir / "image.png"), "--mask", str(model_dir / "mask.png"), "--prompt", "a red circle"]
    argv += ["--model", str(model_dir / "model"), "--out", str(out), "--jump-length", "1", "--jump-n-sample", "2"]
    assert cli.main([*argv, *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    with Image.open(out) as im, Image.open(model_dir / "image.png") as src:
        got, want = np.asarray(im), np.asarray(src)
    keep = _mask(32) >= 0.5
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got[keep], want[keep])
    assert (out.parent / "inpainted_grid.png").is_file()


@pytest.mark.parametrize(
    "mask_name, message",
    [("small_mask.png", "the mask is 16x16 but"), ("missing.png", "no such file")],
)
def test_cli_errors_are_one_line(model_dir, capsys, mask_name, message):
    argv = ["inpaint", str(model_dir / "image.png"), "--mask", str(model_dir / mask_name), "--prompt", "x"]
    assert cli.main([*argv, "--model", str(model_dir / "model"), "--out", str(model_dir / "e.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unclip inpaint: ") and message in err and "\n" not in err
