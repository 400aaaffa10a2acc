"""Damaged or missing data inputs are one-line errors naming the file, never fewer items without a word."""

from __future__ import annotations

import importlib.util
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unclip_jax.input import arrayrecord, sources
from unclip_jax.input.tokenizer import ClipTokenizer

ROOT = Path(__file__).resolve().parents[2]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shard(path: Path, n: int = 8) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for ext, data in (("png", _png(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_whole_shard_reads_every_item(tmp_path):
    _shard(tmp_path / "a.tar")
    assert len(sources.TarSource(str(tmp_path / "a.tar"), image_size=32)) == 8


@pytest.mark.parametrize("where", ["header_boundary", "mid_member", "mid_header"])
def test_truncated_shard_is_an_error_naming_it(tmp_path, where):
    members = _shard(tmp_path / "a.tar")
    raw = (tmp_path / "a.tar").read_bytes()
    cut = {
        "header_boundary": members[2].offset,  # tarfile alone lists 2 of 16 members here, silently
        "mid_member": members[2].offset_data + 100,
        "mid_header": members[2].offset + 200,
    }[where]
    (tmp_path / "a.tar").write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=r"tar shard .*a\.tar is (damaged|truncated)") as e:
        sources.TarSource(str(tmp_path / "a.tar"), image_size=32)
    assert "\n" not in str(e.value)


def test_no_shards_and_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tar shards"):
        sources.TarSource([], image_size=32)
    with pytest.raises(FileNotFoundError, match=r"nope\.tar: no such file"):
        sources.TarSource(str(tmp_path / "nope.tar"), image_size=32)


def _prepare_folder():
    spec = importlib.util.spec_from_file_location("prepare_folder", ROOT / "data" / "prepare_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tars", "{tmp}/none-*.tar"], "matches no file"),
        (["--root", "{tmp}/missing"], "is not a folder"),
        (["--tars", "{tmp}/bad.tar"], "is truncated"),
    ],
)
def test_prepare_folder_one_line_errors(tmp_path, capsys, argv, message):
    members = _shard(tmp_path / "bad.tar")
    raw = (tmp_path / "bad.tar").read_bytes()
    (tmp_path / "bad.tar").write_bytes(raw[: members[4].offset])
    with pytest.raises(SystemExit) as e:
        _prepare_folder()([a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()


def test_missing_data_folder_is_not_called_unfinished(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        arrayrecord.read_manifest(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        arrayrecord.read_manifest(str(tmp_path / "half"))


def test_long_prompt_is_truncated_with_a_warning(caplog):
    tok = ClipTokenizer()
    long = " ".join(["word"] * 504)
    with caplog.at_level(logging.WARNING, logger="unclip_jax.input.tokenizer"):
        ids, mask = tok([long, "a red circle"])
    assert mask[0].all() and ids[0, -1] == tok.eot_token_id
    (record,) = caplog.records
    assert "last 429 tokens were dropped" in record.getMessage()  # 504 words + 2 delimiters - 77
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclip_jax.input.tokenizer"):
        tok(["a red circle"])
    assert not caplog.records
