"""grain input pipelines, one per training stage, over the shards of :mod:`unclip_jax.input.precompute`.

Every pipeline is ``MapDataset.source(shards) -> [host slice] -> shuffle -> repeat ->
(random_)map -> to_iter_dataset (threaded read-ahead) -> batch -> [prefetch]`` and yields
dicts of numpy arrays with a leading batch axis of ``global_batch_size //
process_count`` (each host yields its part of the global batch; turn it into one global
``jax.Array`` with :func:`unclip_jax.parallel.global_batch`). Host ``i`` of ``n`` reads the records
``i, i + n, i + 2n, ...`` (disjoint, together all records). Randomness (order, crops,
degradations) is a pure function of ``seed`` and the record position, so the stream is
deterministic, and the iterator state is small and checkpointable::

    it = iter(make_pipeline("decoder", folder, global_batch_size=64, seed=0))
    state = it.get_state()        # a dict; save it with the train state
    it.set_state(state)           # continue exactly where it stopped
    # Orbax: grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it) as a checkpoint item.

No pipeline flips images horizontally: captions say "left of" / "right of".

Fields (B = global_batch_size // process_count; L = 77 tokens; W = CLIP text width;
P = CLIP projection dim; images NHWC):

prior (:class:`~unclip_jax.train` PriorTask)

=======================  =========  ============  =====================================
field                    dtype      shape         meaning
=======================  =========  ============  =====================================
``input_ids``            int32      [B, L]        CLIP tokens of the caption
``text_mask``            bool       [B, L]        True on real tokens
``text_hidden_states``   float32    [B, L, W]     CLIP text last_hidden_state
``text_embeds``          float32    [B, P]        CLIP text embedding z_t
``image_embeds``         float32    [B, P]        CLIP image embedding z_i (unnormalised;
                                                  mean/std in image_embed_stats.npz)
=======================  =========  ============  =====================================

decoder: the five prior fields plus

=======================  =========  ============  =====================================
``image``                float32    [B, S, S, 3]  in [-1, 1], S = ``image_size`` (64)
=======================  =========  ============  =====================================

upsampler (C = ``round(crop_fraction * target_size)``, default 0.25 * 256 = 64)

=======================  =========  ============  =====================================
``image``                float32    [B, C, C, 3]  high-res random crop, in [-1, 1]
``low_res``              float32    [B, c, c, 3]  its degraded version, c = C //
                                                  ``low_res_factor`` (4), in [-1, 1]
=======================  =========  ============  =====================================

clip

=======================  =========  ============  =====================================
``pixel_values``         float32    [B, S, S, 3]  CLIP-normalised ((x/255 - mean) / std)
``input_ids``            int32      [B, L]        CLIP tokens
``text_mask``            bool       [B, L]        True on real tokens
=======================  =========  ============  =====================================

with ``caption_swaps`` (hard negatives, :mod:`unclip_jax.input.negatives`) also

=========================  =========  ============  ===================================
``negative_input_ids``     int32      [B, L]        the caption with one word swapped
``negative_valid``         bool       [B]           False where no word could be swapped
=========================  =========  ============  ===================================

The prior, decoder and upsampler read an "embed" folder; the upsampler and clip also
read a "prepare" folder (no embeddings; the clip pipeline then tokenises with the
``tokenizer`` it is given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from unclip_jax import stages
from unclip_jax.input import degradations, negatives
from unclip_jax.input.arrayrecord import ShardReader, decode_record
from unclip_jax.input.sources import decode_png
from unclip_jax.input.validate import center_crop_arr

STAGES = stages.INPUT_STAGES  # the pipelines the registry's tasks read
EMBED_FIELDS = ("input_ids", "text_mask", "text_hidden_states", "text_embeds", "image_embeds")
_DTYPES = {"input_ids": np.int32, "text_mask": np.bool_}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # same numbers as unclip_jax.models.clip
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of one stage's pipeline (experiment configs fill it).

    Attributes:
      stage: one of :data:`STAGES`.
      global_batch_size: examples per step over all hosts (divisible by process_count).
      seed: order + augmentation seed.
      num_epochs: None repeats forever.
      shuffle: shuffle records (each epoch differently).
      drop_remainder: drop a last partial batch (always True when repeating forever).
      image_size: decoder / clip image side.
      target_size: upsampler output side the crops are taken at (256 or 1024).
      crop_fraction: upsampler crop side as a fraction of target_size (0.25, appendix C).
      low_res_factor: high-res / low-res side ratio (4).
      degradation: "blur" (stage 1) or "bsr" (stage 2).
      caption_swaps: clip only: word groups for hard-negative captions (:func:`unclip_jax.input.negatives.parse_swaps`
        spells them); '' for none.
      read_threads: threads decoding records ahead of the batcher.
      read_buffer: records decoded ahead.
      prefetch_batches: batches prepared ahead in a background thread (0: none).
      worker_count: >0 uses grain multiprocessing workers instead of the thread.
      process_index / process_count: this host (default ``jax.process_index/count()``).
    """

    stage: str
    global_batch_size: int
    seed: int = 0
    num_epochs: int | None = None
    shuffle: bool = True
    drop_remainder: bool = True
    image_size: int = 64
    target_size: int = 256
    crop_fraction: float = 0.25
    low_res_factor: int = 4
    degradation: str = "blur"
    caption_swaps: str = ""
    read_threads: int = 4
    read_buffer: int = 64
    prefetch_batches: int = 2
    worker_count: int = 0
    process_index: int | None = None
    process_count: int | None = None


def _embeddings(rec: dict) -> dict[str, np.ndarray]:
    missing = [k for k in EMBED_FIELDS if k not in rec]
    if missing:
        raise KeyError(
            f"record {rec.get('id')!r} has no {missing}: this stage needs an 'embed' folder "
            "(unclip_jax.input.precompute.precompute_embeddings), not a 'prepare' one"
        )
    return {k: np.asarray(rec[k], _DTYPES.get(k, np.float32)) for k in EMBED_FIELDS}


def _to_unit(image_u8: np.ndarray) -> np.ndarray:
    return image_u8.astype(np.float32) / 127.5 - 1.0


class _Stage:
    """Turns one raw record (bytes) into the stage's example; picklable for grain workers."""

    def __init__(self, cfg: PipelineConfig, tokenizer: Callable | None):
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.stage == "upsampler":
            self.crop = int(round(cfg.crop_fraction * cfg.target_size))
            if self.crop % cfg.low_res_factor:
                raise ValueError(
                    f"upsampler crop {self.crop} (crop_fraction {cfg.crop_fraction} x target_size "
                    f"{cfg.target_size}) must be divisible by low_res_factor {cfg.low_res_factor}"
                )
            if cfg.degradation not in degradations.DEGRADATIONS:
                raise ValueError(f"degradation {cfg.degradation!r}: expected one of {list(degradations.DEGRADATIONS)}")
        self.swaps = negatives.parse_swaps(cfg.caption_swaps)
        if self.swaps and cfg.stage != "clip":
            raise ValueError(f"data.caption_swaps is for the clip pipeline, not {cfg.stage!r}: set it to ''")
        if self.swaps and tokenizer is None:
            raise ValueError("data.caption_swaps needs the clip pipeline's tokenizer (hard negatives are new captions)")

    def __call__(self, raw: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg = self.cfg
        rec = decode_record(raw)
        if cfg.stage == "prior":
            return _embeddings(rec)
        image = decode_png(rec["image_png"])
        if cfg.stage == "decoder":
            return {"image": _to_unit(center_crop_arr(image, cfg.image_size)), **_embeddings(rec)}
        if cfg.stage == "upsampler":
            if min(image.shape[:2]) < cfg.target_size:
                raise ValueError(
                    f"record {rec.get('id')!r}: image {image.shape[0]}x{image.shape[1]} is smaller than the "
                    f"upsampler target_size {cfg.target_size}; prepare the data at >= {cfg.target_size}"
                )
            image = center_crop_arr(image, cfg.target_size)
            top, left = rng.integers(0, cfg.target_size - self.crop + 1, size=2)
            high = image[top : top + self.crop, left : left + self.crop].astype(np.float32) / 255.0
            low = degradations.degrade(high, cfg.degradation, rng, cfg.low_res_factor)
            return {"image": high * 2.0 - 1.0, "low_res": low.astype(np.float32) * 2.0 - 1.0}
        if cfg.stage == "clip":
            x = center_crop_arr(image, cfg.image_size).astype(np.float32) / 255.0
            x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
            if "input_ids" in rec:
                ids, mask = rec["input_ids"], rec["text_mask"]
            elif self.tokenizer is not None:
                ids, mask = self.tokenizer([rec["caption"]])
                ids, mask = ids[0], mask[0]
            else:
                raise ValueError("clip pipeline over a 'prepare' folder needs a tokenizer (records hold no input_ids)")
            out = {
                "pixel_values": x.astype(np.float32),
                "input_ids": np.asarray(ids, np.int32),
                "text_mask": np.asarray(mask, bool),
            }
            if self.swaps:
                if "caption" not in rec:
                    raise ValueError(f"record {rec.get('id')!r} has no caption to swap words in (data.caption_swaps)")
                negative = negatives.swap_caption(str(rec["caption"]), self.swaps, rng)
                neg_ids, _ = self.tokenizer([rec["caption"] if negative is None else negative])
                out["negative_input_ids"] = np.asarray(neg_ids[0], np.int32)
                out["negative_valid"] = np.asarray(negative is not None)
            return out
        raise ValueError(f"stage {cfg.stage!r}: expected one of {STAGES}")


class _RawShards:
    """Random access to the raw record bytes (decoding happens in the map, in parallel)."""

    def __init__(self, folder: str):
        self.reader = ShardReader(folder)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> bytes:
        return self.reader.raw(i)


def host_records(num_records: int, process_index: int, process_count: int) -> range:
    """Record positions host ``process_index`` reads (``range(i, n, count)``)."""
    return range(process_index, num_records, process_count)


def make_pipeline(
    stage_or_config: str | PipelineConfig,
    folder: str,
    *,
    tokenizer: Callable | None = None,
    **kwargs,
):
    """Builds the grain ``IterDataset`` of one stage over a finished shard folder.

    Args:
      stage_or_config: a stage name (then ``kwargs`` are :class:`PipelineConfig` fields)
        or a full config.
      folder: shard folder with a manifest.
      tokenizer: only for the clip stage over a "prepare" folder.

    Returns:
      ``grain.IterDataset``; ``iter()`` it for a checkpointable ``DatasetIterator``.
    """
    import grain
    import jax

    cfg = stage_or_config if isinstance(stage_or_config, PipelineConfig) else PipelineConfig(stage_or_config, **kwargs)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage {cfg.stage!r}: expected one of {STAGES}")
    pi = jax.process_index() if cfg.process_index is None else cfg.process_index
    pc = jax.process_count() if cfg.process_count is None else cfg.process_count
    if cfg.global_batch_size % pc:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} must be divisible by process_count {pc}")
    local_batch = cfg.global_batch_size // pc
    transform = _Stage(cfg, tokenizer)

    ds = grain.MapDataset.source(_RawShards(folder))
    if pc > 1:
        ds = ds[pi::pc]
    if len(ds) == 0:
        raise ValueError(f"{folder}: host {pi} of {pc} has no records")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.random_map(transform, seed=cfg.seed + 1)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer))
    ds = ds.batch(local_batch, drop_remainder=cfg.drop_remainder or cfg.num_epochs is None)
    if cfg.worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    elif cfg.prefetch_batches > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch_batches)
    return ds
