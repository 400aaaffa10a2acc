"""python data/prepare_folder.py --root /path/to/images --captions captions.jsonl --out /tmp/unclip_data/myset_256 --image_size 256

Turns a folder of captioned images into random-access ArrayRecord shards. Captions come
from a JSON-lines or CSV file (one row per (image, caption) pair; columns
``file_name``/``file``/``image``/``path`` and ``caption``/``text``), or use
``--tars 'shards/*.tar'`` for webdataset tar shards (``key.jpg`` + ``key.txt``). Images
of any mode and size are resized (short side, bicubic, antialiased) and centre-cropped
to ``--image_size`` as the FID protocol does. Bad files and captions are skipped and
counted by reason; the counts are printed and stored in ``manifest.json``. Resumable.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from unclip_jax.convert.paths import check_output_folder
from unclip_jax.input import precompute, sources
from unclip_jax.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="image folder")
    p.add_argument("--captions", default="captions.jsonl", help="caption file in --root (.jsonl or .csv)")
    p.add_argument("--tars", default=None, help="glob of webdataset tar shards (instead of --root)")
    p.add_argument("--out", required=True)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--min_size", type=int, default=16, help="skip images whose short side is smaller")
    p.add_argument("--shard_size", type=int, default=1024)
    args = p.parse_args(argv)
    setup_logging()
    try:
        if args.image_size < 1 or args.shard_size < 1:
            raise ValueError("--image_size and --shard_size: expected integers >= 1")
        check_output_folder(args.out, "--out")
        if args.tars:
            paths = sorted(glob.glob(args.tars))
            if not paths:
                p.error(f"--tars {args.tars!r} matches no file")
            src = sources.TarSource(paths, image_size=args.image_size, min_size=args.min_size)
        elif args.root:
            if not os.path.isdir(args.root):
                p.error(f"--root {args.root!r} is not a folder")
            src = sources.FolderSource(args.root, args.captions, image_size=args.image_size, min_size=args.min_size)
        else:
            p.error("give --root (with --captions) or --tars")
    except (OSError, ValueError) as e:
        p.error(str(e))
    manifest = precompute.prepare(src, args.out, shard_size=args.shard_size)
    print(json.dumps({k: manifest.get(k) for k in ("num_items", "num_records", "skipped")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
