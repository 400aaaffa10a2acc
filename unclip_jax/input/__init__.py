"""unclip_jax.input: data sources, CLIP-embedding precompute, per-stage grain pipelines.

Modules (imported on demand; nothing heavy is loaded by ``import unclip_jax.input``):

- ``synthetic``: the built-in captioned-shapes dataset (deterministic, no download).
- ``sources``: synthetic / image folder / webdataset tar / MS-COCO (tfds) / shard sources.
- ``validate``: bad-input checks (skip + count by reason) and FID-protocol resizing.
- ``arrayrecord``: record codec and atomic ArrayRecord shard folders.
- ``precompute``: resumable, host- and device-sharded "prepare" and "embed" jobs.
- ``pipelines``: grain pipelines for the prior, decoder, upsampler and clip stages
  (field tables in its docstring).
- ``degradations``: Gaussian blur and BSR (light) conditioning corruptions.
- ``tokenizer``: CLIP BPE tokenizer.
- ``testing``: byte tokenizer + fake CLIP for fast tests.
"""
