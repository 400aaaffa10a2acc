"""``unclip convert import|export --component NAME SRC DST``: the weight bridge on the command line.

- ``import``: a diffusers / transformers folder (a component folder, or a whole pipeline
  folder whose ``NAME/`` subfolder is used) -> a native folder (``config.json`` +
  ``params.safetensors``, :mod:`unclip_jax.convert.native`).
- ``export``: a native folder -> a folder that ``from_pretrained`` loads in
  diffusers / transformers (``--format diffusers``, the default), or the network's forward for another
  runtime: ``--format onnx`` (ONNX Runtime), ``savedmodel`` (TensorFlow) or ``stablehlo`` (JAX alone); see
  :mod:`unclip_jax.convert.formats`.

Components are the converters of :data:`unclip_jax.convert.registry.CONVERTERS`, plus ``pipeline`` (a whole
``UnCLIPPipeline`` folder, :mod:`unclip_jax.convert.pipeline`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unclip_jax import stages
from unclip_jax.convert import formats, io, pipeline, registry
from unclip_jax.convert.native import load_native, save_native
from unclip_jax.convert.paths import check_output_folder

# The whole UnCLIPPipeline folder (every network + schedulers + tokenizer files).
PIPELINE = "pipeline"
CHOICES = (*registry.CONVERTERS, PIPELINE)
DIFFUSERS = "diffusers"  # the PyTorch layout of each component's converter (transformers for CLIP)
FORMAT_CHOICES = (DIFFUSERS, *formats.FORMATS)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``convert`` (with ``import`` / ``export``) to a top-level CLI's subparsers."""
    p = subparsers.add_parser("convert", help="import/export weights between diffusers/transformers and unclip_jax")
    p.add_argument("direction", choices=["import", "export"], help="import: PyTorch layout -> native; export: reverse")
    p.add_argument("--component", required=True, help=f"one of {sorted(CHOICES)}")
    p.add_argument(
        "--format",
        default=DIFFUSERS,
        choices=FORMAT_CHOICES,
        help="export only: diffusers/transformers folder (default), or the network's forward as onnx, savedmodel "
        f"or stablehlo (components {', '.join(stages.COMPONENT_NAMES)})",
    )
    p.add_argument("src", type=Path, help="source folder")
    p.add_argument("dst", type=Path, help="destination folder (written atomically)")
    p.set_defaults(func=run)
    return p


def export_format(component: str, src: Path, dst: Path, fmt: str) -> Path:
    """Exports the network of the native folder ``src`` (a pipeline component) as ``fmt`` (ONNX, SavedModel,
    StableHLO) with its serving signature, source config and training diffusion in the manifest."""
    if component not in stages.COMPONENT_NAMES:
        raise io.ConversionError(
            f"--component {component} cannot be exported as {fmt}: expected one of {list(stages.COMPONENT_NAMES)}"
        )
    module, variables = load_native(src)
    allowed = [path.rpartition(":")[2] for path in stages.component(component).modules]
    if type(module).__name__ not in allowed:
        raise io.ConversionError(
            f"{src}: holds a {type(module).__name__}, but --component {component} expects {allowed}"
        )
    diffusion = src / "diffusion.json"
    try:
        return formats.export_network(
            module,
            variables,
            dst,
            fmt,
            component=component,
            source_config=io.read_config(src),
            diffusion=json.loads(diffusion.read_text()) if diffusion.is_file() else None,
        )
    except formats.ExportError as e:
        raise io.ConversionError(str(e)) from e


def convert(direction: str, component: str, src: Path, dst: Path, fmt: str = DIFFUSERS) -> Path:
    """Converts one component folder; returns the written folder (``fmt``: export only, see :func:`export_format`)."""
    if fmt != DIFFUSERS:
        if direction != "export":
            raise io.ConversionError(f"--format {fmt} applies to export only (import reads diffusers/transformers)")
        return export_format(component, src, dst, fmt)
    if component == PIPELINE:
        if direction == "import":
            return pipeline.save_native_bundle(pipeline.read_diffusers_pipeline(src), dst)
        return pipeline.write_diffusers_pipeline(pipeline.load_native_bundle(src), dst)
    if component not in registry.CONVERTERS:
        raise io.ConversionError(f"--component {component!r}: expected one of {sorted(CHOICES)}")
    c = registry.converter(component)
    if direction == "import":
        module, variables = c.load(src)
        return save_native(module, variables, dst)
    if direction == "export":
        module, variables = load_native(src)
        if not isinstance(module, c.module_types):
            expected = " or ".join(t.__name__ for t in c.module_types)
            raise io.ConversionError(
                f"{src}: holds a {type(module).__name__}, but --component {component} expects {expected}"
            )
        return c.save(module, variables, dst)
    raise ValueError(f"direction {direction!r}: expected 'import' or 'export'")


def check_destination(src: Path, dst: Path) -> None:
    """Checked before anything is read: ``dst`` can be written (a folder, created beside its final name and moved
    into place, :func:`unclip_jax.convert.io.staged_folder`) and is not ``src`` itself (which it would replace).

    Raises:
      ValueError: naming the path (one line under ``unclip``, exit code 2).
    """
    if dst.absolute().resolve() == src.absolute().resolve():
        raise ValueError(f"destination {dst}: is the source folder; give another folder (the source would be replaced)")
    check_output_folder(dst, "destination")


def run(args: argparse.Namespace) -> int:
    """Entry point for the parsed ``convert`` arguments; returns a process exit code (1: the conversion failed;
    an unwritable destination raises ValueError before any work)."""
    check_destination(Path(args.src), Path(args.dst))
    try:
        out = convert(args.direction, args.component, Path(args.src), Path(args.dst), args.format)
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
