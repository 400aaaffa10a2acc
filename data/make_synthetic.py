"""python data/make_synthetic.py --out /tmp/unclip_data/synthetic_64 --num_examples 20000 --image_size 64 --seed 0

Writes the built-in captioned-shapes dataset (:mod:`unclip_jax.input.synthetic`) as
random-access ArrayRecord shards (id, caption, PNG image, ground-truth ``attr/*``), the
same "prepare" format as MS-COCO and image folders. ``--image_size 256`` gives the
upsamplers' data (the decoder pipeline resizes to 64). ``--png_dir`` also writes PNGs
plus a ``captions.jsonl`` for eyeballing (that folder is itself a valid
``prepare_folder.py`` input). ``--scenes large`` draws larger objects and fewer two-object
scenes (``synthetic.SCENES``). Resumable: re-run the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
import os

from unclip_jax.convert.paths import check_output_folder
from unclip_jax.input import precompute, sources, synthetic
from unclip_jax.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="shard folder to write")
    p.add_argument("--num_examples", type=int, default=20000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scenes", default=synthetic.DEFAULT_SCENES, choices=tuple(synthetic.SCENES), help="scene distribution"
    )
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--png_dir", default=None, help="also write PNG files + captions.jsonl here")
    p.add_argument("--png_count", type=int, default=64, help="how many examples go to --png_dir")
    args = p.parse_args(argv)
    setup_logging()
    try:  # before any example is made
        if args.num_examples < 1 or args.image_size < 1 or args.shard_size < 1:
            raise ValueError("--num_examples, --image_size and --shard_size: expected integers >= 1")
        check_output_folder(args.out, "--out")
        if args.png_dir:
            check_output_folder(args.png_dir, "--png_dir")
    except ValueError as e:
        p.error(str(e))
    src = sources.SyntheticSource(args.num_examples, seed=args.seed, image_size=args.image_size, scenes=args.scenes)
    manifest = precompute.prepare(src, args.out, shard_size=args.shard_size)
    print(f"{args.out}: {manifest.get('num_records')} examples")
    if args.png_dir:
        from PIL import Image

        os.makedirs(args.png_dir, exist_ok=True)
        with open(os.path.join(args.png_dir, "captions.jsonl"), "w") as f:
            for i in range(min(args.png_count, args.num_examples)):
                ex = synthetic.example(i, args.seed, (args.image_size,), scenes=args.scenes)
                name = f"{i:06d}.png"
                Image.fromarray(ex["image"]).save(os.path.join(args.png_dir, name))
                f.write(json.dumps({"file_name": name, "caption": ex["caption"]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
