"""Evaluation metrics: FID (pytorch-fid / fid-helper numerics), KID, precision/recall, CLIP score.

- :mod:`unclip_jax.evaluate.fid`: float64 streaming feature statistics, Frechet distance,
  ``.npz`` reference statistics.
- :mod:`unclip_jax.evaluate.kid`: KID and improved precision/recall.
- :mod:`unclip_jax.evaluate.clip_score`: CLIP score (raw and Hessel-scaled).

The Inception network is :mod:`unclip_jax.models.inception`; its weights are imported by
:mod:`unclip_jax.convert.inception`.
"""
