"""``unclip convert import|export --component NAME SRC DST``: the weight bridge on the command line.

- ``import``: a diffusers / transformers folder (a component folder, or a whole pipeline
  folder whose ``NAME/`` subfolder is used) -> a native folder (``config.json`` +
  ``params.safetensors``, :mod:`unclip_jax.convert.native`).
- ``export``: a native folder -> a folder that ``from_pretrained`` loads in
  diffusers / transformers.

Components are registered in :data:`COMPONENTS` (name -> :class:`Component`); the
decoder/upsampler converters add their entries there.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unclip_jax.convert import clip, decoder, io, pipeline, prior, upsampler
from unclip_jax.convert.native import load_native, save_native
from unclip_jax.models.decoder import Decoder, UnCLIPDecoder, UnCLIPTextProj
from unclip_jax.models.upsampler import SuperResUNet


@dataclasses.dataclass(frozen=True)
class Component:
    """How to read and write one component.

    Attributes:
      load: folder -> (module, variables) from the PyTorch layout.
      save: (module, variables, folder) -> path, to the PyTorch layout.
      module_type: the linen class the native folder must hold (checked on export).
      library: "diffusers" or "transformers" (for messages).
    """

    load: Callable[..., tuple[Any, dict]]
    save: Callable[[Any, dict, Path], Path]
    module_type: type
    library: str


COMPONENTS: dict[str, Component] = {
    "prior": Component(prior.load_prior, prior.save_prior, prior.PriorTransformer, "diffusers"),
    "text_encoder": Component(clip.load_text_encoder, clip.save_text_encoder, clip.CLIPTextModel, "transformers"),
    "image_encoder": Component(clip.load_image_encoder, clip.save_image_encoder, clip.CLIPVisionModel, "transformers"),
    "clip": Component(clip.load_clip, clip.save_clip, clip.CLIP, "transformers"),
    "decoder": Component(decoder.load_decoder, decoder.save_decoder, Decoder, "diffusers"),
    "text_proj": Component(decoder.load_text_proj, decoder.save_text_proj, UnCLIPTextProj, "diffusers"),
    # decoder + text_proj together (the pipeline's decoder); src/dst hold decoder/ and text_proj/.
    "unclip_decoder": Component(decoder.load_unclip_decoder, decoder.save_unclip_decoder, UnCLIPDecoder, "diffusers"),
    "super_res_first": Component(upsampler.load_super_res_first, upsampler.save_upsampler, SuperResUNet, "diffusers"),
    "super_res_last": Component(upsampler.load_super_res_last, upsampler.save_upsampler, SuperResUNet, "diffusers"),
}
# The whole UnCLIPPipeline folder (every network + schedulers + tokenizer files).
PIPELINE = "pipeline"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``convert`` (with ``import`` / ``export``) to a top-level CLI's subparsers."""
    p = subparsers.add_parser("convert", help="import/export weights between diffusers/transformers and unclip_jax")
    p.add_argument("direction", choices=["import", "export"], help="import: PyTorch layout -> native; export: reverse")
    p.add_argument("--component", required=True, help=f"one of {sorted([*COMPONENTS, PIPELINE])}")
    p.add_argument("src", type=Path, help="source folder")
    p.add_argument("dst", type=Path, help="destination folder (written atomically)")
    p.set_defaults(func=run)
    return p


def convert(direction: str, component: str, src: Path, dst: Path) -> Path:
    """Converts one component folder; returns the written folder."""
    if component == PIPELINE:
        if direction == "import":
            return pipeline.save_native_pipeline(pipeline.load_pipeline(src), dst)
        return pipeline.save_pipeline(pipeline.load_native_pipeline(src), dst)
    if component not in COMPONENTS:
        raise io.ConversionError(f"--component {component!r}: expected one of {sorted([*COMPONENTS, PIPELINE])}")
    c = COMPONENTS[component]
    if direction == "import":
        module, variables = c.load(src)
        return save_native(module, variables, dst)
    if direction == "export":
        module, variables = load_native(src)
        if not isinstance(module, c.module_type):
            raise io.ConversionError(
                f"{src}: holds a {type(module).__name__}, but --component {component} expects {c.module_type.__name__}"
            )
        return c.save(module, variables, dst)
    raise ValueError(f"direction {direction!r}: expected 'import' or 'export'")


def run(args: argparse.Namespace) -> int:
    """Entry point for the parsed ``convert`` arguments; returns a process exit code."""
    try:
        out = convert(args.direction, args.component, Path(args.src), Path(args.dst))
    except io.ConversionError as e:
        print(f"convert {args.direction} --component {args.component}: {e}")
        return 1
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone ``python -m unclip_jax.convert.commands convert import ...``."""
    parser = argparse.ArgumentParser(prog="unclip")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
