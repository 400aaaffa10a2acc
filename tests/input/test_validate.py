"""Bad input is skipped and counted by reason; every image mode loads; FID-protocol resizing."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from unclip_jax.input import precompute, sources, validate
from unclip_jax.input.arrayrecord import ShardReader


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds no pixel data (a bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


RNG = np.random.default_rng(0)
GOOD = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """A folder whose caption file mixes good rows with every kind of bad input."""
    root = tmp_path_factory.mktemp("bad")
    jpeg = _jpeg(GOOD)
    files = {
        "good1.jpg": jpeg,
        "good2.png": _png(GOOD),
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "notimage.jpg": b"this is a text file, not an image\n" * 10,
        "tiny.png": _png(np.zeros((1, 1, 3), np.uint8)),
        "bomb.png": _png_header_only(50_000, 50_000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    rows = [
        ("good1.jpg", "a good photo"),
        ("good2.png", "another good photo"),
        ("empty.jpg", "zero bytes"),
        ("truncated.jpg", "half a jpeg"),
        ("notimage.jpg", "text with a jpg name"),
        ("tiny.png", "one pixel"),
        ("bomb.png", "fifty thousand squared"),
        ("missing.jpg", "no such file"),
        ("good1.jpg", ""),
        ("good1.jpg", "   \t "),
        ("good1.jpg", "word " * 400),
    ]
    lines = [json.dumps({"file_name": f, "caption": c}).encode() for f, c in rows]
    lines.append(b'{"file_name": "good1.jpg", "caption": "caf\xe9 latin-1 bytes"}')  # not UTF-8
    lines.append(b"{not json")
    lines.append(b'{"caption": "no file field"}')
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


EXPECTED = {
    "empty_file": 1,
    "truncated_image": 1,
    "not_an_image": 1,
    "too_small": 1,
    "decompression_bomb": 1,
    "missing_file": 1,
    "empty_caption": 2,
    "caption_too_long": 1,
    "caption_not_utf8": 1,
    "bad_record": 2,
}


def test_bad_inputs_are_skipped_and_counted(bad_folder, tmp_path):
    src = sources.FolderSource(str(bad_folder), "captions.jsonl", image_size=32)
    assert len(src) == 14
    manifest = precompute.prepare(src, str(tmp_path / "out"), shard_size=5, progress=False)
    assert manifest["skipped"]["counts"] == EXPECTED
    assert manifest["num_items"] == 14
    assert manifest["num_records"] == 2 == 14 - sum(EXPECTED.values())
    reader = ShardReader(str(tmp_path / "out"))
    assert sorted(reader[i]["caption"] for i in range(len(reader))) == ["a good photo", "another good photo"]
    # each reason keeps an example naming the item, for the report
    assert all(manifest["skipped"]["examples"][r] for r in EXPECTED)


def test_same_corpus_as_webdataset_tar(bad_folder, tmp_path):
    path = tmp_path / "shard-0.tar"
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(["good1.jpg", "truncated.jpg", "tiny.png", "bomb.png", "good2.png"]):
            tf.add(bad_folder / name, arcname=f"{i:03d}.{name.split('.')[1]}")
            cap = b"caf\xe9" if i == 4 else f"caption {i}".encode()
            info = tarfile.TarInfo(f"{i:03d}.txt")
            info.size = len(cap)
            tf.addfile(info, io.BytesIO(cap))
        info = tarfile.TarInfo("005.txt")  # caption without image
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    src = sources.TarSource(str(path), image_size=32)
    m = precompute.prepare(src, str(tmp_path / "out"), shard_size=4, progress=False)
    assert m["skipped"]["counts"] == {
        "truncated_image": 1,
        "too_small": 1,
        "decompression_bomb": 1,
        "caption_not_utf8": 1,
        "bad_record": 1,
    }
    assert m["num_records"] == 1


def test_bomb_check_happens_before_decoding():
    with pytest.raises(validate.BadInput) as e:
        validate.decode_image(_png_header_only(100_000, 100_000))
    assert e.value.reason == "decompression_bomb"
    # a real image over a (lowered) limit
    with pytest.raises(validate.BadInput) as e:
        validate.decode_image(_png(GOOD), max_pixels=40 * 60 - 1)
    assert e.value.reason == "decompression_bomb"
    assert validate.decode_image(_png(GOOD), max_pixels=40 * 60).shape == (40, 60, 3)


def test_every_mode_loads_as_rgb():
    grey16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27).astype(np.uint16)
    rgba = np.concatenate([GOOD, np.full((40, 60, 1), 255, np.uint8)], -1)
    rgba[:, :10, 3] = 0  # transparent stripe -> white
    images = {
        "RGB": Image.fromarray(GOOD),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": Image.fromarray(GOOD[..., 0]),
        "P": Image.fromarray(GOOD).convert("P"),
        "CMYK": Image.fromarray(GOOD).convert("CMYK"),
        "I;16": Image.fromarray(grey16),
    }
    for mode, img in images.items():
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        arr = validate.decode_image(buf.getvalue())
        assert arr.shape == (40, 60, 3) and arr.dtype == np.uint8, mode
        if mode == "RGBA":
            assert (arr[:, :10] == 255).all() and np.array_equal(arr[:, 10:], GOOD[:, 10:])
        if mode == "I;16":  # rescaled to 8 bits, not clipped at 255
            np.testing.assert_allclose(arr[..., 0], np.rint(grey16 / 257.0), atol=1)
            assert arr.max() > 200
        if mode == "L":
            assert np.array_equal(arr[..., 1], GOOD[..., 0])


def test_center_crop_follows_the_fid_protocol():
    """Short side to size (box halving, then bicubic), centre crop; matches guided-diffusion's recipe."""
    img = RNG.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    out = validate.center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    ref = Image.fromarray(img)
    while min(*ref.size) >= 128:
        ref = ref.resize(tuple(x // 2 for x in ref.size), resample=Image.BOX)
    s = 64 / min(*ref.size)
    ref = np.asarray(ref.resize(tuple(round(x * s) for x in ref.size), resample=Image.BICUBIC))
    top, left = (ref.shape[0] - 64) // 2, (ref.shape[1] - 64) // 2
    np.testing.assert_array_equal(out, ref[top : top + 64, left : left + 64])
    # an upscale keeps the aspect and never returns a non-square
    assert validate.center_crop_arr(img[:20, :50], 64).shape == (64, 64, 3)


def test_caption_checks():
    assert validate.check_caption(b"  a  red\ncircle ") == "a red circle"
    for raw, reason in [(b"\xff\xfe", "caption_not_utf8"), ("", "empty_caption"), ("x" * 2000, "caption_too_long")]:
        with pytest.raises(validate.BadInput) as e:
            validate.check_caption(raw)
        assert e.value.reason == reason
