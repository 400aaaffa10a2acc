"""Evaluation: metrics (FID with pytorch-fid / fid-helper numerics, KID, precision/recall, CLIP score) and the
MS-COCO 30k zero-shot protocol of the paper (section 5) with guidance sweeps.

- :mod:`unclip_jax.evaluate.fid`: float64 streaming feature statistics, Frechet distance,
  ``.npz`` reference statistics.
- :mod:`unclip_jax.evaluate.kid`: KID and improved precision/recall.
- :mod:`unclip_jax.evaluate.clip_score`: CLIP score (raw and Hessel-scaled).
- :mod:`unclip_jax.evaluate.protocol`: the protocol's settings, interfaces and deterministic choices; its steps in
  :mod:`~unclip_jax.evaluate.reference`, :mod:`~unclip_jax.evaluate.generation` and
  :mod:`~unclip_jax.evaluate.report` (``evaluate``: the whole); :mod:`~unclip_jax.evaluate.instruments` (Inception,
  CLIP) and :mod:`~unclip_jax.evaluate.storage` (atomic files, identities, hosts).
- :mod:`unclip_jax.evaluate.sweep`: FID and CLIP score against guidance (figure 11).
- :mod:`unclip_jax.evaluate.commands`: ``unclip evaluate``.

The Inception network is :mod:`unclip_jax.models.inception`; its weights are imported by
:mod:`unclip_jax.convert.inception`.
"""
