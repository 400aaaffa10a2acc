"""Sharded, resumable jobs over a source: "prepare" (images + captions) and "embed" (frozen CLIP).

unCLIP trains its prior and decoder on CLIP embeddings computed once, up front
(section 2). :func:`precompute_embeddings` runs a frozen CLIP over a source and writes
ArrayRecord shards; :func:`prepare` writes the same shards without embeddings (used to
turn MS-COCO's tfds stream into random-access shards, and for the CLIP stage).

Job layout and guarantees (see :mod:`unclip_jax.input.arrayrecord` for the files):

* The source's items are cut into ``ceil(len / shard_size)`` shards of consecutive
  items; host ``process_index`` of ``process_count`` owns the shards ``k`` with
  ``k % process_count == process_index`` (disjoint, together all of them).
* Within a host the batch is sharded over a 1D ``("data",)`` mesh of the local
  devices (padded to a fixed multiple of the device count, so one compilation).
* Each shard is committed atomically; a killed job, re-run with the same arguments,
  skips committed shards and redoes the rest: no example is lost or duplicated.
  ``job.json`` pins the arguments that decide shard contents; a re-run with other
  values is refused with the differing field named.
* Bad items are skipped and counted by reason (:mod:`unclip_jax.input.validate`);
  when every shard is committed the job writes ``manifest.json`` (counts, skips,
  fields) and, for "embed", ``image_embed_stats.npz`` (per-dimension ``mean``, ``std``
  and ``count`` of the image embeddings, float64 accumulation) that the prior uses to
  normalise its inputs.

Record fields ("embed" job; "prepare" has only id, caption, image_png and attr/*):

=======================  =========  ==========  ========================================
field                    dtype      shape       meaning
=======================  =========  ==========  ========================================
``id``                   str        -           source example id
``caption``              str        -           cleaned caption
``image_png``            bytes      -           PNG of the uint8 [S, S, 3] image
``input_ids``            int32      [L]         CLIP tokens (L = 77)
``text_mask``            bool       [L]         tokenizer attention mask
``text_hidden_states``   float32*   [L, W]      CLIP text ``last_hidden_state``
``text_embeds``          float32    [P]         CLIP text embedding (projected)
``image_embeds``         float32    [P]         CLIP image embedding (projected)
``attr/<name>``          int/float  various     synthetic ground truth (if any)
=======================  =========  ==========  ========================================

(*) ``hidden_dtype="float16"`` halves the dominant size for large datasets.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from unclip_jax.input import arrayrecord
from unclip_jax.input.sources import Example, Source, encode_png
from unclip_jax.input.validate import BadInput, SkipReport

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]
ProcessFn = Callable[[list[Example]], list[dict]]
JOB_FILE = "job.json"
STATS_FILE = "image_embed_stats.npz"
NULL_CAPTION_FILE = "null_caption.npz"  # CLIP of "" (see write_null_caption)


def _base_record(ex: Example) -> dict:
    rec = {"id": ex["id"], "caption": ex["caption"], "image_png": encode_png(ex["image"])}
    rec.update({k: v for k, v in ex.items() if k.startswith("attr/")})
    return rec


def prepare_records(examples: list[Example]) -> list[dict]:
    """The "prepare" job's process function: id, caption, PNG image, attributes."""
    return [_base_record(ex) for ex in examples]


class EmbedFn:
    """The "embed" job's process function: tokenise, encode with a frozen CLIP, build records.

    The CLIP is injected as two callables so that tests (and other encoders) can stand in:

    Args:
      tokenizer: ``list[str] -> (input_ids int32 [B, L], attention_mask bool [B, L])``
        (``unclip_jax.input.tokenizer.ClipTokenizer()``).
      encode_text_fn: ``input_ids [B, L] -> dict(text_embeds [B, P], last_hidden_state [B, L, W])``.
      encode_image_fn: ``uint8 images [B, S, S, 3] -> dict(image_embeds [B, P])`` (does
        its own CLIP preprocessing; see :func:`clip_encoders`).
      batch_size: examples per device call; rounded up to a multiple of the local
        device count; short batches are padded (the padding is dropped).
      hidden_dtype: stored dtype of ``text_hidden_states``.
      devices: devices of the data mesh (default ``jax.local_devices()``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        encode_text_fn: Callable,
        encode_image_fn: Callable,
        batch_size: int = 64,
        hidden_dtype: str = "float32",
        devices: Sequence | None = None,
    ):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.tokenizer = tokenizer
        self.devices = list(devices) if devices is not None else jax.local_devices()
        n = len(self.devices)
        self.batch_size = int(math.ceil(batch_size / n) * n)
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        self.sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.encode_text_fn = jax.jit(encode_text_fn)
        self.encode_image_fn = jax.jit(encode_image_fn)
        self.hidden_dtype = np.dtype(hidden_dtype)
        self.sums: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.count = 0

    def _put(self, x: np.ndarray):
        import jax

        n = x.shape[0]
        if n < self.batch_size:
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, axis=0)])
        return jax.device_put(x, self.sharding)

    def _encode(self, examples: list[Example]) -> list[dict]:
        n = len(examples)
        ids, mask = self.tokenizer([ex["caption"] for ex in examples])
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        images = np.stack([ex["image"] for ex in examples]).astype(np.uint8)
        t = self.encode_text_fn(self._put(ids))
        v = self.encode_image_fn(self._put(images))
        text_embeds = np.asarray(t["text_embeds"], np.float32)[:n]
        hidden = np.asarray(t["last_hidden_state"])[:n].astype(self.hidden_dtype)
        image_embeds = np.asarray(v["image_embeds"], np.float32)[:n]
        out = []
        for i, ex in enumerate(examples):
            rec = _base_record(ex)
            rec.update(
                input_ids=ids[i],
                text_mask=mask[i],
                text_hidden_states=hidden[i],
                text_embeds=text_embeds[i],
                image_embeds=image_embeds[i],
            )
            out.append(rec)
        return out

    def __call__(self, examples: list[Example]) -> list[dict]:
        out = []
        for s in range(0, len(examples), self.batch_size):
            out.extend(self._encode(examples[s : s + self.batch_size]))
        return out


def _stats_of(records: list[dict]) -> dict:
    if not records or "image_embeds" not in records[0]:
        return {}
    e = np.stack([r["image_embeds"] for r in records]).astype(np.float64)
    return {"sum": e.sum(0).tolist(), "sumsq": (e * e).sum(0).tolist(), "count": int(e.shape[0])}


def _fields(rec: dict) -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, str):
            out[k] = {"dtype": "str", "shape": []}
        elif isinstance(v, bytes):
            out[k] = {"dtype": "bytes", "shape": []}
        else:
            v = np.asarray(v)
            out[k] = {"dtype": str(v.dtype), "shape": list(v.shape)}
    return out


def _check_job(out_dir: str, job: dict) -> None:
    path = os.path.join(out_dir, JOB_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), job.get(k)) for k in set(old) | set(job) if old.get(k) != job.get(k)}
        if diff:
            raise ValueError(
                f"{path}: this folder was written by a job with different settings "
                f"(field: (stored, now)) {diff}; use a new output folder or the same settings"
            )
    else:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(job, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def run_job(
    source: Source,
    out_dir: str,
    process_fn: ProcessFn = prepare_records,
    *,
    kind: str = "prepare",
    shard_size: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    job_extra: dict | None = None,
) -> dict:
    """Runs ``process_fn`` over this host's uncommitted shards of ``source``; finalises if all are done.

    Args:
      source: a :class:`~unclip_jax.input.sources.Source`.
      out_dir: shard folder (created).
      process_fn: valid examples of a shard -> records (dicts for ``encode_record``).
      kind: "prepare" or "embed" (recorded in job.json and the manifest).
      shard_size: items per shard (the unit of resumption).
      process_index / process_count: this host and the number of hosts (default: jax's).
      progress: show a tqdm progress bar over this host's items.
      job_extra: more settings that decide the shard contents (checked on resume).

    Returns:
      The manifest dict if every shard is committed, else a dict with
      ``{"complete": False, "committed": n, "num_shards": N}``.
    """
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must be in [0, process_count={pc})")
    os.makedirs(out_dir, exist_ok=True)
    num_items = len(source)
    num_shards = max(1, math.ceil(num_items / shard_size))
    job = {"kind": kind, "source": source.describe(), "shard_size": shard_size, "num_shards": num_shards}
    job.update(job_extra or {})
    job = json.loads(json.dumps(job))  # normalise tuples etc. for the comparison
    _check_job(out_dir, job)

    done = arrayrecord.committed_shards(out_dir)
    mine = [k for k in range(num_shards) if k % pc == pi and k not in done]
    todo_items = sum(min(num_items, (k + 1) * shard_size) - k * shard_size for k in mine)
    if done:
        log.info("%s: %d of %d shards already committed; resuming", out_dir, len(done), num_shards)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo_items, desc=f"{kind} {os.path.basename(out_dir.rstrip('/'))}", unit="item")
    try:
        for k in mine:
            start, stop = k * shard_size, min(num_items, (k + 1) * shard_size)
            report = SkipReport()
            examples: list[Example] = []
            for index, item in source.iter_items(start, stop):
                if isinstance(item, BadInput):
                    report.add(item.reason, f"item {index}", item.detail)
                else:
                    examples.extend(item)
                if bar is not None:
                    bar.update(1)
            records = process_fn(examples) if examples else []
            meta = {
                "shard_index": k,
                "item_range": [start, stop],
                "skipped": report.to_dict(),
                "stats": _stats_of(records),
                "fields": _fields(records[0]) if records else {},
            }
            arrayrecord.write_shard(out_dir, k, num_shards, (arrayrecord.encode_record(r) for r in records), meta)
            if report.total:
                log.warning("%s shard %d: %s", out_dir, k, report.summary())
    finally:
        if bar is not None:
            bar.close()

    if pc > 1 and process_index is None:  # real multi-host run: wait for the others
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"unclip_jax.input.run_job:{out_dir}")
    done = arrayrecord.committed_shards(out_dir)
    if len(done) < num_shards:
        return {"complete": False, "committed": len(done), "num_shards": num_shards}
    if pi != 0 and process_index is None:
        return arrayrecord.read_manifest(out_dir) if _wait_manifest(out_dir) else {"complete": True}
    return finalize(out_dir)


def _wait_manifest(out_dir: str, timeout: float = 600.0) -> bool:
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(os.path.join(out_dir, arrayrecord.MANIFEST)):
            return True
        time.sleep(0.5)
    return False


def finalize(out_dir: str) -> dict:
    """Merges the shard markers into ``manifest.json`` (and ``image_embed_stats.npz``).

    Returns:
      The manifest: num_items, num_records, num_shards, skipped (counts + examples),
      fields (dtype/shape of each record field), and for "embed" the stats file name.
    """
    with open(os.path.join(out_dir, JOB_FILE)) as f:
        job = json.load(f)
    done = arrayrecord.committed_shards(out_dir)
    missing = [k for k in range(job["num_shards"]) if k not in done]
    if missing:
        raise RuntimeError(f"{out_dir}: shards {missing[:10]} are not committed yet; run the job again to finish")
    report = SkipReport()
    num_records = num_items = 0
    fields: dict = {}
    s = ss = None
    count = 0
    for k in range(job["num_shards"]):
        meta = done[k]
        report.merge(meta["skipped"])
        num_records += meta["num_records"]
        num_items += meta["item_range"][1] - meta["item_range"][0]
        fields = fields or meta.get("fields", {})
        st = meta.get("stats") or {}
        if st:
            s = np.asarray(st["sum"]) if s is None else s + np.asarray(st["sum"])
            ss = np.asarray(st["sumsq"]) if ss is None else ss + np.asarray(st["sumsq"])
            count += st["count"]
    manifest = {
        "kind": job["kind"],
        "source": job["source"],
        "num_shards": job["num_shards"],
        "num_items": num_items,
        "num_records": num_records,
        "skipped": report.to_dict(),
        "fields": fields,
    }
    if count:
        mean = s / count
        std = np.sqrt(np.maximum(ss / count - mean * mean, 0.0))
        np.savez(os.path.join(out_dir, STATS_FILE), mean=mean, std=std, count=np.int64(count))
        manifest["image_embed_stats"] = STATS_FILE
    tmp = os.path.join(out_dir, arrayrecord.MANIFEST + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, arrayrecord.MANIFEST))
    log.info(
        "%s: %d records from %d items in %d shards; %s",
        out_dir,
        num_records,
        num_items,
        job["num_shards"],
        report.summary(),
    )
    return manifest


def prepare(source: Source, out_dir: str, **kwargs) -> dict:
    """Writes ``source`` as random-access shards (id, caption, PNG image, attributes); see :func:`run_job`."""
    return run_job(source, out_dir, prepare_records, kind="prepare", **kwargs)


def precompute_embeddings(
    source: Source,
    out_dir: str,
    *,
    tokenizer: Tokenizer,
    encode_text_fn: Callable,
    encode_image_fn: Callable,
    batch_size: int = 64,
    hidden_dtype: str = "float32",
    clip_name: str = "",
    devices: Sequence | None = None,
    **kwargs,
) -> dict:
    """Runs a frozen CLIP over ``source`` and writes embedding shards; see :class:`EmbedFn` and :func:`run_job`.

    Args:
      clip_name: identifies the CLIP (variant / weights folder) in job.json, so that a
        resume with another CLIP is refused.
    """
    fn = EmbedFn(tokenizer, encode_text_fn, encode_image_fn, batch_size, hidden_dtype, devices)
    extra = {"clip": clip_name, "hidden_dtype": hidden_dtype, **kwargs.pop("job_extra", {})}
    manifest = run_job(source, out_dir, fn, kind="embed", job_extra=extra, **kwargs)
    import jax

    if manifest.get("complete", True) and jax.process_index() == 0:
        manifest["null_caption"] = write_null_caption(out_dir, fn)
    return manifest


def write_null_caption(out_dir: str, fn: EmbedFn) -> str:
    """Writes ``null_caption.npz``: the CLIP encoding of the empty caption ("").

    Arrays ``text_embeds`` [1, D], ``text_hidden_states`` [1, L, Dt], ``text_mask`` [1, L]: what the prior and
    decoder tasks put in place of a dropped caption (classifier-free guidance training) and what the samplers' unconditional
    branch feeds (Karlo / diffusers ``UnCLIPPipeline`` encode "" for it), so that training and sampling agree.
    Written atomically; returns the file name.
    """
    ids, mask = fn.tokenizer([""])
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    t = fn.encode_text_fn(fn._put(ids))
    arrays = {
        "text_embeds": np.asarray(t["text_embeds"], np.float32)[:1],
        "text_hidden_states": np.asarray(t["last_hidden_state"])[:1].astype(fn.hidden_dtype),
        "text_mask": mask[:1],
    }
    tmp = os.path.join(out_dir, f".{NULL_CAPTION_FILE}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out_dir, NULL_CAPTION_FILE))
    return NULL_CAPTION_FILE


def clip_encoders(model, params, image_size: int | None = None) -> tuple[Callable, Callable]:
    """``(encode_text_fn, encode_image_fn)`` for :func:`precompute_embeddings` from a linen CLIP.

    Args:
      model: ``unclip_jax.models.clip.CLIP`` (methods ``encode_text`` / ``encode_image``).
      params: its variables (``{"params": ...}``), boxed or not.
      image_size: CLIP input side (default ``model.vision["image_size"]``); uint8 images
        are resized + normalised by ``unclip_jax.models.clip.preprocess_images``.
    """
    import flax.linen as nn

    from unclip_jax.models.clip import preprocess_images

    variables = nn.unbox(params)
    size = image_size or dict(model.vision)["image_size"]

    def encode_text_fn(input_ids):
        return model.apply(variables, input_ids, method=model.encode_text)

    def encode_image_fn(images):
        return model.apply(variables, preprocess_images(images, size), method=model.encode_image)

    return encode_text_fn, encode_image_fn


def load_image_embed_stats(folder: str) -> dict[str, np.ndarray]:
    """``{"mean": [P], "std": [P], "count": []}`` written by an "embed" job."""
    path = os.path.join(folder, STATS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the embedding precompute over {folder} to the end")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
