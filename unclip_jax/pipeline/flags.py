"""The command-line flags shared by the sampling commands and ``unclip evaluate``: the model, the per-stage sampling
settings, and loading the pipeline they name.

- :func:`add_pipeline_arguments`: ``--model DIR`` and a path flag per component (``--prior WORKDIR`` ...: training
  workdirs, native or diffusers folders; the flags of :data:`unclip_jax.stages.COMPONENTS`), ``--prior-kind``, the
  per-stage ``--<stage>-steps/-sampler/-eta/-guidance`` (prefixes of :data:`unclip_jax.stages.STAGES`), the AR prior's
  ``--prior-temperature/-top-k/-top-p``, ``--stop-after``, ``--seed`` and ``--out``.
- :func:`stage_settings`: those flags as per-stage `StageSettings` over given defaults.
- :func:`load_from_args`: the pipeline they name (``--prior ar`` / ``--prior diffusion`` with no such file is short
  for ``--prior-kind``), with a one-line message on a load error.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unclip_jax import stages
from unclip_jax.input.tokenizer import TOKENIZER_KINDS

COMPONENT_FLAGS: dict[str, str] = {c.name: c.flag for c in stages.COMPONENTS}
STAGE_FLAGS: dict[str, str] = {s.name: s.flag for s in stages.STAGES}


def steps_spec(value: str) -> int | str:
    """``--<stage>-steps``: an int (UnCLIPScheduler spacing) or a respacing spec (``ddim50``)."""
    return int(value) if value.isdigit() else value


def float_list(value: str) -> list[float]:
    """Comma-separated numbers (``0,0.25,0.5``)."""
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from e


def add_pipeline_arguments(
    parser: argparse.ArgumentParser,
    guided: tuple[str, ...],
    default_out: str,
    *,
    out_help: str = "grid PNG; singles are written beside it",
    stop_after_help: str = "last stage to run (default: the last upsampler loaded)",
) -> None:
    """Adds the model, sampling and output flags; ``guided``: the stages that get a ``--<stage>-guidance`` flag."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", type=Path, default=None, help="pipeline folder (diffusers Karlo layout or native)")
    for comp, flag in COMPONENT_FLAGS.items():
        g.add_argument(
            f"--{flag}",
            dest=f"path_{comp}",
            type=Path,
            default=None,
            help=f"{comp}: training workdir (export/ema), native or diffusers folder (overrides --model)"
            + (
                "; a diffusion (PriorTransformer) or autoregressive (ARPrior, native/workdir only) prior, detected "
                "from the folder; 'ar' / 'diffusion' (no such file) = --prior-kind ar / diffusion"
                if comp == "prior"
                else ""
            ),
        )
    g.add_argument(
        "--tokenizer",
        choices=TOKENIZER_KINDS,
        default="openai",
        help="openai: our CLIP BPE with OpenAI's text cleaning (what Karlo's CLIP was trained with; default); "
        "folder: the transformers CLIPTokenizer in the model folder's tokenizer/ (what diffusers runs)",
    )
    if "prior" in guided:
        g.add_argument(
            "--prior-kind",
            dest="prior_kind",
            choices=("auto", "diffusion", "ar"),
            default="auto",
            help="which prior to use: auto (whatever the prior folder holds), diffusion or ar (autoregressive; "
            "without --prior PATH it is looked up in MODEL/ar_prior, then MODEL/prior). '--prior ar' is short for "
            "'--prior-kind ar'",
        )
    s = parser.add_argument_group("sampling (per stage; defaults: Karlo's)")
    for stage, flag in STAGE_FLAGS.items():
        note = " (diffusion prior only)" if stage == "prior" else ""
        s.add_argument(
            f"--{flag}-steps", dest=f"{stage}_steps", type=steps_spec, default=None, help=f"{stage} steps{note}"
        )
        s.add_argument(f"--{flag}-sampler", dest=f"{stage}_sampler", choices=("ddpm", "ddim"), default=None)
        s.add_argument(f"--{flag}-eta", dest=f"{stage}_eta", type=float, default=None, help=f"DDIM eta{note}")
        if stage in guided:
            s.add_argument(
                f"--{flag}-guidance",
                dest=f"{stage}_guidance",
                type=float,
                default=None,
                help="classifier-free guidance scale (<= 0: unguided)",
            )
    if "prior" in guided:
        s.add_argument(
            "--prior-temperature",
            dest="prior_temperature",
            type=float,
            default=None,
            help="AR prior only: softmax temperature of the code tokens (default 1)",
        )
        s.add_argument(
            "--prior-top-k",
            dest="prior_top_k",
            type=int,
            default=None,
            help="AR prior only: keep the k most likely code tokens (default 0: off)",
        )
        s.add_argument(
            "--prior-top-p",
            dest="prior_top_p",
            type=float,
            default=None,
            help="AR prior only: nucleus sampling of the code tokens, in (0, 1] (default 1: off)",
        )
    s.add_argument("--stop-after", choices=stages.STAGE_NAMES[1:], default=None, help=stop_after_help)
    s.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(default_out), help=out_help)


def stage_settings(args: argparse.Namespace, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Per-stage `StageSettings`: ``defaults`` with the stage flags given on the command line applied (an eta > 0
    switches a ``ddpm`` stage to ``ddim``; a guidance <= 0 means unguided)."""
    from unclip_jax.pipeline.settings import StageSettings

    out = {}
    for stage, base in defaults.items():
        steps = getattr(args, f"{stage}_steps", None)
        sampler = getattr(args, f"{stage}_sampler", None)
        eta = getattr(args, f"{stage}_eta", None)
        guidance = getattr(args, f"{stage}_guidance", None)
        kw = {}
        for name in ("temperature", "top_k", "top_p"):  # the AR prior's (only the prior has these flags)
            value = getattr(args, f"{stage}_{name}", None)
            if value is not None:
                kw[name] = value
        if steps is not None:
            kw["steps"] = steps
        if sampler is not None:
            kw["sampler"] = sampler
        if eta is not None:
            kw["eta"] = eta
            if eta and kw.get("sampler", base.sampler) == "ddpm":
                kw["sampler"] = "ddim"
        if guidance is not None:
            kw["guidance_scale"] = guidance if guidance > 0 else None
        out[stage] = StageSettings(**{**base.__dict__, **kw})
    return out


def resolve_prior_kind(args: argparse.Namespace) -> str:
    """``--prior ar`` / ``--prior diffusion`` (no such file or folder) is ``--prior-kind``; returns the kind and clears
    ``args.path_prior`` in that case (so that later readers of the paths see no prior path)."""
    kind = getattr(args, "prior_kind", "auto") or "auto"
    path = getattr(args, "path_prior", None)
    if path is not None and str(path) in ("ar", "diffusion") and not Path(path).exists():
        if kind not in ("auto", str(path)):
            raise SystemExit(f"unclip: --prior {path} contradicts --prior-kind {kind}")
        kind, args.path_prior = str(path), None
    args.prior_kind = kind
    return kind


def component_paths(args: argparse.Namespace) -> dict[str, Path | None]:
    """The per-component path flags (``--prior PATH`` ...) by component name (None: not given)."""
    return {comp: getattr(args, f"path_{comp}", None) for comp in COMPONENT_FLAGS}


def load_from_args(args: argparse.Namespace, require: tuple[str, ...]):
    """The `UnclipPipeline` the flags name (``require``: components that must be found; ``super_res_first`` too
    unless ``--stop-after decoder``); a load error exits with its one-line message."""
    from unclip_jax.pipeline.loading import PipelineLoadError, load_pipeline

    kind = resolve_prior_kind(args)
    paths = component_paths(args)
    if args.model is None and not any(paths.values()):
        raise SystemExit("unclip: give --model DIR or component paths (--prior, --decoder, ...)")
    require = require + (() if args.stop_after == "decoder" else ("super_res_first",))
    t0 = time.perf_counter()
    try:
        pipe = load_pipeline(args.model, paths=paths, require=require, prior_kind=kind, tokenizer_kind=args.tokenizer)
    except PipelineLoadError as e:  # names the component and the folders searched
        raise SystemExit(f"unclip: {e}") from e
    loaded = [k for k, v in pipe.components.items() if v is not None]
    kind_note = f" (prior: {pipe.prior_kind})" if pipe.prior_kind else ""
    print(f"[unclip] loaded {', '.join(loaded)}{kind_note} in {time.perf_counter() - t0:.1f}s", flush=True)
    return pipe
