"""python data/precompute_embeddings.py --src /tmp/unclip_data/synthetic_64 --out /tmp/unclip_data/synthetic_64_emb --clip_variant tiny --clip_folder /path/to/clip

Runs a frozen CLIP over a prepared shard folder (from make_synthetic.py,
prepare_folder.py or prepare_coco.py) and writes embedding shards: tokens, text hidden
states + mask, text and image embeddings, the image, and ``image_embed_stats.npz``
(per-dimension mean/std of the image embeddings for the prior). The CLIP comes from
``--clip_folder`` (a transformers ``CLIPModel`` folder, via unclip_jax.convert.clip, or a native folder such as
the ``export/ema`` of ``unclip train --config=experiments/clip.py:...``) or,
without it, is a randomly initialised ``--clip_variant`` (smoke tests only). Batches
are sharded over the local devices; on several hosts run the same command on each
(hosts take disjoint shards). Resumable: re-run the same command after a kill.
"""

from __future__ import annotations

import argparse
import json

from unclip_jax.convert.paths import check_input, check_output_folder
from unclip_jax.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="prepared shard folder")
    p.add_argument("--out", required=True)
    p.add_argument("--clip_folder", default=None, help="transformers CLIPModel folder or native unclip_jax CLIP folder")
    p.add_argument("--clip_variant", default="test", help="unclip_jax.models.clip variant if no --clip_folder")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--hidden_dtype", default="float32", choices=("float32", "float16"))
    args = p.parse_args(argv)
    setup_logging()
    try:  # before CLIP loads
        if args.batch_size < 1 or args.shard_size < 1:
            raise ValueError("--batch_size and --shard_size: expected integers >= 1")
        check_input(args.src, "--src")
        if args.clip_folder:
            check_input(args.clip_folder, "--clip_folder")
        check_output_folder(args.out, "--out")
    except ValueError as e:
        p.error(str(e))

    import jax
    import jax.numpy as jnp

    from unclip_jax.input import precompute, sources
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models import clip

    if args.clip_folder:
        from unclip_jax.convert import native
        from unclip_jax.convert.clip import load_clip

        if native.is_native(args.clip_folder):
            model, variables = native.load_native(args.clip_folder)
            if not isinstance(model, clip.CLIP):
                raise SystemExit(f"--clip_folder={args.clip_folder}: holds a {type(model).__name__}, not a CLIP")
        else:
            model, variables = load_clip(args.clip_folder)
        name = args.clip_folder
    else:
        model = clip.build(args.clip_variant)
        size = clip.VARIANTS[args.clip_variant]["vision"]["image_size"]
        variables = jax.jit(model.init)(
            jax.random.key(0), jnp.zeros((1, 77), jnp.int32), jnp.zeros((1, size, size, 3), jnp.float32)
        )
        name = f"random:{args.clip_variant}"
    text_fn, image_fn = precompute.clip_encoders(model, variables)
    manifest = precompute.precompute_embeddings(
        sources.ShardSource(args.src),
        args.out,
        tokenizer=ClipTokenizer(),
        encode_text_fn=text_fn,
        encode_image_fn=image_fn,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        hidden_dtype=args.hidden_dtype,
        clip_name=name,
    )
    print(json.dumps({k: manifest.get(k) for k in ("num_items", "num_records", "skipped", "complete")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
