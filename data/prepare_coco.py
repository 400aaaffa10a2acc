"""python data/prepare_coco.py --split karpathy_train --out /tmp/unclip_data/coco_train_256 --image_size 256

MS-COCO 2014 captions (tensorflow-datasets ``coco_captions/2014``, Karpathy & Li
splits) into random-access ArrayRecord shards, one record per (image, caption) pair
(``--captions first`` for one per image). ``--split val2014`` is all of COCO val2014
(val + test + restval), the pool the FID protocol samples its 30,000 captions from;
``karpathy_train`` is train + restval. tfds downloads and builds the dataset on first
use (``--data_dir``; about 38 GB). Corrupt images are skipped and counted. Resumable.
"""

from __future__ import annotations

import argparse
import json

from unclip_jax.convert.paths import check_output_folder
from unclip_jax.input import precompute, sources
from unclip_jax.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="karpathy_train", help=f"one of {sorted(sources.COCO_SPLITS)} or a tfds split")
    p.add_argument("--out", required=True)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--captions", choices=("all", "first"), default="all")
    p.add_argument("--data_dir", default=None, help="tensorflow-datasets data dir")
    p.add_argument("--shard_size", type=int, default=512, help="images per shard")
    args = p.parse_args(argv)
    setup_logging()
    try:  # before tfds downloads anything
        if args.image_size < 1 or args.shard_size < 1:
            raise ValueError("--image_size and --shard_size: expected integers >= 1")
        check_output_folder(args.out, "--out")
    except ValueError as e:
        p.error(str(e))
    import tensorflow_datasets as tfds

    tfds.builder("coco_captions/2014", data_dir=args.data_dir).download_and_prepare()
    src = sources.CocoSource(args.split, image_size=args.image_size, captions=args.captions, data_dir=args.data_dir)
    manifest = precompute.prepare(src, args.out, shard_size=args.shard_size)
    print(json.dumps({k: manifest.get(k) for k in ("num_items", "num_records", "skipped")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
