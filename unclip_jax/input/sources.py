"""Example sources: the built-in synthetic set, image folders, webdataset tars, MS-COCO, shards.

A source has ``len(source)`` *items* (an image file, a tfds record, a synthetic index)
and ``source.iter_items(start, stop)``, which yields exactly one
``(index, list_of_examples | BadInput)`` per item in ``[start, stop)``, in order. An
item gives several examples when an image has several captions (MS-COCO with
``captions="all"``). An example is::

    dict(id=str, caption=str, image=uint8 [S, S, 3], **{"attr/...": np.ndarray})

with the image already resized + centre-cropped to the source's ``image_size`` S (the
FID protocol's ``center_crop_arr``, see :mod:`unclip_jax.input.validate`). Bad images
and captions come back as :class:`~unclip_jax.input.validate.BadInput` so that the
job (:mod:`unclip_jax.input.precompute`) can skip and count them.

Sources:

* :class:`SyntheticSource` -- :mod:`unclip_jax.input.synthetic`, one example per index.
* :class:`FolderSource` -- a folder of images + ``captions.jsonl`` or ``.csv`` (one row
  per (image, caption) pair; columns ``file_name``/``file``/``image``/``path`` and
  ``caption``/``text``); any PIL mode (RGB, RGBA, L, P, CMYK, 16-bit).
* :class:`TarSource` -- webdataset tar shards (``key.jpg`` + ``key.txt`` members).
* :class:`CocoSource` -- tfds ``coco_captions/2014`` (Karpathy splits), streamed;
  :data:`COCO_SPLITS` maps names to tfds splits, ``"val2014"`` being all 40,504 val2014
  images (the pool the FID protocol draws its 30k captions from).
* :class:`ShardSource` -- the records of a finished shard folder (prepared or embedded).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from unclip_jax.input import synthetic
from unclip_jax.input.validate import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    BadInput,
    center_crop_arr,
    check_caption,
    load_example_image,
)

Example = dict
Item = list[Example] | BadInput

IMAGE_KEYS = ("file_name", "file", "image", "path", "filename")
CAPTION_KEYS = ("caption", "text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class Source:
    """Base class: subclasses implement ``__len__`` and either ``load`` or ``iter_items``."""

    name: str = "source"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> list[Example]:
        """Examples of item ``index``; raises :class:`BadInput` for a bad item."""
        raise NotImplementedError

    def iter_items(self, start: int, stop: int) -> Iterator[tuple[int, Item]]:
        for i in range(start, stop):
            try:
                yield i, self.load(i)
            except BadInput as e:
                yield i, e

    def describe(self) -> dict:
        """What identifies this source in a job's ``job.json`` (resume checks it)."""
        return {"name": self.name, "num_items": len(self)}


class _ImageChecks:
    def __init__(self, image_size, min_size, max_pixels, max_caption_chars):
        self.image_size = image_size
        self.min_size = min_size
        self.max_pixels = max_pixels
        self.max_caption_chars = max_caption_chars

    def _example(self, id_: str, data: bytes | None, caption) -> Example:
        caption = check_caption(caption, max_chars=self.max_caption_chars)
        image = load_example_image(data, self.image_size, min_size=self.min_size, max_pixels=self.max_pixels, where=id_)
        return {"id": id_, "caption": caption, "image": image}


class SyntheticSource(Source):
    """The captioned-shapes set of :mod:`unclip_jax.input.synthetic` as a source (``scenes``: a name of its
    :data:`~unclip_jax.input.synthetic.SCENES`)."""

    def __init__(
        self,
        num_examples: int,
        seed: int = 0,
        image_size: int = 64,
        canvas: int = 512,
        scenes: str = synthetic.DEFAULT_SCENES,
    ):
        synthetic.scenes_named(scenes)  # a bad name fails here, before any example is made
        self.num_examples, self.seed, self.image_size, self.canvas = num_examples, seed, image_size, canvas
        self.scenes = scenes
        self.name = f"synthetic(seed={seed})" if scenes == "standard" else f"synthetic(seed={seed}, scenes={scenes})"

    def __len__(self) -> int:
        return self.num_examples

    def load(self, index: int) -> list[Example]:
        ex = synthetic.example(index, self.seed, (self.image_size,), self.canvas, self.scenes)
        del ex[f"image_{self.image_size}"]
        return [ex]

    def describe(self) -> dict:
        out = {**super().describe(), "seed": self.seed, "image_size": self.image_size, "canvas": self.canvas}
        # Jobs written before scene distributions existed were all "standard": they resume as they were.
        return out if self.scenes == "standard" else {**out, "scenes": self.scenes}


def _read_caption_rows(path: str) -> list[tuple[str | None, object]]:
    """Rows of a JSONL or CSV caption file as (image file or None, raw caption or BadInput).

    The file is decoded with ``surrogateescape`` so that one bad byte sequence spoils
    only its own caption (which :func:`check_caption` then rejects as not UTF-8).
    """
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    rows: list[tuple[str | None, object]] = []
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                rows.append((None, BadInput("bad_record", f"{path}:{n}: {e}")))
                continue
            rows.append(_row(rec, f"{path}:{n}"))
    elif path.endswith(".csv"):
        for n, rec in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
            rows.append(_row(rec, f"{path}:{n}"))
    else:
        raise ValueError(f"caption file {path!r}: expected a .jsonl or .csv file")
    return rows


def _row(rec: dict, where: str) -> tuple[str | None, object]:
    file = next((rec[k] for k in IMAGE_KEYS if rec.get(k)), None)
    if file is None:
        return None, BadInput("bad_record", f"{where}: no image field (one of {IMAGE_KEYS})")
    caption = next((rec[k] for k in CAPTION_KEYS if k in rec), None)
    return str(file), caption


class FolderSource(_ImageChecks, Source):
    """A folder of images with captions in a JSON-lines or CSV file.

    Args:
      root: folder holding the images (paths in the caption file are relative to it).
      captions: caption file name inside ``root`` (or an absolute path).
      image_size: every image is resized + centre-cropped to this square size.
      min_size / max_pixels / max_caption_chars: see :mod:`unclip_jax.input.validate`.
    """

    def __init__(
        self,
        root: str,
        captions: str = "captions.jsonl",
        image_size: int = 64,
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    ):
        _ImageChecks.__init__(self, image_size, min_size, max_pixels, max_caption_chars)
        self.root = root
        self.captions_path = captions if os.path.isabs(captions) else os.path.join(root, captions)
        if not os.path.exists(self.captions_path):
            raise FileNotFoundError(f"caption file {self.captions_path} not found (expected .jsonl or .csv)")
        self.rows = _read_caption_rows(self.captions_path)
        self.name = f"folder({root})"

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> list[Example]:
        file, caption = self.rows[index]
        if isinstance(caption, BadInput):
            raise caption
        path = os.path.join(self.root, file)
        if not os.path.isfile(path):
            raise BadInput("missing_file", path)
        with open(path, "rb") as f:
            data = f.read()
        ex = self._example(f"{file}#{index}", data, caption)
        return [ex]

    def describe(self) -> dict:
        return {**super().describe(), "captions": self.captions_path, "image_size": self.image_size}


class TarSource(_ImageChecks, Source):
    """Webdataset-style tar shards: members ``<key>.<image ext>`` and ``<key>.txt`` (or ``.json``).

    Items are the keys in tar order; a key without an image or caption member is a
    ``bad_record``.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        image_size: int = 64,
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    ):
        _ImageChecks.__init__(self, image_size, min_size, max_pixels, max_caption_chars)
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        self.index: list[tuple[str, str, dict[str, tarfile.TarInfo]]] = []
        if not self.paths:
            raise FileNotFoundError("TarSource: no tar shards given (a --tars pattern that matched nothing?)")
        for p in self.paths:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in _tar_members(p):
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                groups.setdefault(os.path.join(os.path.dirname(m.name), key), {})[ext.lower()] = m
            self.index.extend((p, k, g) for k, g in groups.items())
        self.name = f"tar({len(self.paths)} shards)"
        self._open: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _read(self, path: str, member: tarfile.TarInfo) -> bytes:
        if path not in self._open:
            self._open[path] = tarfile.open(path)
        return self._open[path].extractfile(member).read()

    def load(self, index: int) -> list[Example]:
        path, key, group = self.index[index]
        img = next((group[e] for e in IMAGE_EXTS if e in group), None)
        if img is None:
            raise BadInput("bad_record", f"{path}:{key}: no image member ({IMAGE_EXTS})")
        if "txt" in group:
            caption = self._read(path, group["txt"])
        elif "json" in group:
            try:
                caption = json.loads(self._read(path, group["json"]).decode("utf-8", "surrogateescape"))
                caption = next((caption[k] for k in CAPTION_KEYS if k in caption), None)
            except (ValueError, TypeError) as e:
                raise BadInput("bad_record", f"{path}:{key}.json: {e}") from None
        else:
            raise BadInput("bad_record", f"{path}:{key}: no .txt or .json caption")
        return [self._example(key, self._read(path, img), caption)]

    def describe(self) -> dict:
        return {**super().describe(), "paths": self.paths, "image_size": self.image_size}


def _tar_members(path: str) -> list[tarfile.TarInfo]:
    """The members of a tar shard, checked whole: a shard cut short (mid-member, or exactly at a header boundary,
    where ``tarfile`` alone would list fewer members without a word) is a one-line ``ValueError`` naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tar shard {path}: no such file")
    try:
        with tarfile.open(path) as tf:
            members = tf.getmembers()
            for m in members:  # reading past the end of a member raises for a shard cut inside one
                if m.isfile() and m.offset_data + m.size > os.path.getsize(path):
                    raise tarfile.ReadError("unexpected end of data")
    except tarfile.TarError as e:
        raise ValueError(f"tar shard {path} is damaged ({e}); re-create it or leave it out") from None
    # A complete archive ends with two zero blocks after the last member's padded data (POSIX.1-1988).
    end = 0
    if members:
        last = members[-1]
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or any(marker):
        raise ValueError(
            f"tar shard {path} is truncated after {len(members)} members (no end-of-archive marker); "
            "re-create it or leave it out"
        )
    return members


COCO_SPLITS = {
    "train": "train",
    "karpathy_train": "train+restval",  # Karpathy & Li training images (113,287)
    "karpathy_val": "val",  # 5,000
    "karpathy_test": "test",  # 5,000
    "restval": "restval",
    "val2014": "val+test+restval",  # the whole of COCO val2014 (40,504): the FID protocol's pool
}


class CocoSource(_ImageChecks, Source):
    """MS-COCO 2014 captions through tensorflow-datasets (``coco_captions/2014``), streamed.

    Images are read undecoded (``tfds.decode.SkipDecoding``) and decoded by
    :func:`~unclip_jax.input.validate.decode_image`, so corrupt JPEGs are counted like
    any other bad input. Items are images in tfds order (``shuffle_files=False``);
    ``captions="all"`` gives one example per (image, caption) pair, ``"first"`` one per
    image. The stream is opened once and moved forward: ``iter_items`` must be called
    with increasing ranges (as the shard job does); skipped items are not decoded.

    Args:
      split: a key of :data:`COCO_SPLITS` or any tfds split string.
      data_dir: tfds data dir (None: tfds default).
      skip_decoding: read JPEG bytes and decode them here (default). False lets tfds
        decode (needed under ``tfds.testing.mock_data``, whose random sequences break
        with custom decoders); a corrupt JPEG then stops the stream instead of being counted.
      num_items: number of images in the split, when tfds has no split metadata (mock
        data); default: from the dataset info, else counted with one pass.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 64,
        captions: str = "all",
        data_dir: str | None = None,
        name: str = "coco_captions/2014",
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
        skip_decoding: bool = True,
        num_items: int | None = None,
    ):
        import tensorflow_datasets as tfds

        self.skip_decoding = skip_decoding
        if captions not in ("all", "first"):
            raise ValueError(f"CocoSource captions={captions!r}: expected 'all' or 'first'")
        _ImageChecks.__init__(self, image_size, min_size, max_pixels, max_caption_chars)
        self.split = COCO_SPLITS.get(split, split)
        self.captions, self.data_dir, self.tfds_name = captions, data_dir, name
        self.builder = tfds.builder(name, data_dir=data_dir)
        if num_items is not None:
            self._len = int(num_items)
        else:
            try:
                self._len = int(self.builder.info.splits[self.split].num_examples)
            except KeyError:  # no split metadata (tfds mock data): count the records once
                self._len = sum(1 for _ in self._stream())
        self.name = f"coco({self.split})"
        self._it = None
        self._pos = 0

    def __len__(self) -> int:
        return self._len

    def _stream(self):
        import tensorflow_datasets as tfds

        decoders = {"image": tfds.decode.SkipDecoding()} if self.skip_decoding else None
        ds = self.builder.as_dataset(split=self.split, shuffle_files=False, decoders=decoders)
        return iter(tfds.as_numpy(ds))

    def iter_items(self, start: int, stop: int) -> Iterator[tuple[int, Item]]:
        if self._it is None or start < self._pos:
            self._it, self._pos = self._stream(), 0
        while self._pos < start:  # move forward without decoding
            next(self._it)
            self._pos += 1
        for i in range(start, stop):
            try:
                rec = next(self._it)
            except StopIteration:
                raise RuntimeError(
                    f"{self.name}: tfds stream ended at item {i}, but the split info says {self._len} items"
                ) from None
            self._pos += 1
            yield i, self._examples(rec)

    def _examples(self, rec: dict) -> Item:
        image_id = int(rec["image/id"])
        texts = list(rec["captions"]["text"])
        cap_ids = [int(c) for c in rec["captions"]["id"]]
        if len(cap_ids) != len(texts) or len(set(cap_ids)) != len(cap_ids):  # ids are only for naming
            cap_ids = list(range(len(texts)))
        if not texts:
            return BadInput("empty_caption", f"coco image {image_id}: no captions")
        if self.captions == "first":
            texts, cap_ids = texts[:1], cap_ids[:1]
        try:
            image = load_example_image(
                rec["image"], self.image_size, min_size=self.min_size, max_pixels=self.max_pixels, where=str(image_id)
            )
        except BadInput as e:
            return e
        out = []
        for text, cid in zip(texts, cap_ids, strict=True):
            try:
                caption = check_caption(text, max_chars=self.max_caption_chars)
            except BadInput as e:
                if len(texts) == 1:
                    return e
                continue  # other captions of this image remain
            out.append({"id": f"coco-{image_id}-{cid}", "caption": caption, "image": image})
        return out or BadInput("empty_caption", f"coco image {image_id}: every caption rejected")

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "captions": self.captions, "image_size": self.image_size}


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL format) bytes -> uint8 [H, W, 3]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardSource(Source):
    """Records of a finished shard folder as a source (e.g. prepared COCO -> embedding job)."""

    def __init__(self, folder: str, image_size: int | None = None):
        from unclip_jax.input.arrayrecord import ShardReader

        self.reader = ShardReader(folder)
        self.folder, self.image_size = folder, image_size
        self.name = f"shards({folder})"

    def __len__(self) -> int:
        return len(self.reader)

    def load(self, index: int) -> list[Example]:
        rec = self.reader[index]
        image = decode_png(rec.pop("image_png"))
        if self.image_size is not None:
            image = center_crop_arr(image, self.image_size)
        ex = {"id": rec["id"], "caption": rec["caption"], "image": image}
        ex.update({k: v for k, v in rec.items() if k.startswith("attr/")})
        return [ex]

    def describe(self) -> dict:
        return {**super().describe(), "folder": os.path.abspath(self.folder), "image_size": self.image_size}
