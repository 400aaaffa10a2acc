"""Does inpainting draw what the prompt asks? The demo's inpainting measurement (issue 21).

On the built-in captioned-shapes dataset (:mod:`unclip_jax.input.synthetic`), each case is a one-object scene of the
validation seed rendered **without** its object (the empty background) and a mask whose hole is a square around
where the object was (:func:`inpaint_cases`); the prompt is the scene's own caption (which always names the object's
colour and shape). The demo's cascade inpaints the hole under the prompt and the demo's attribute classifier
(:mod:`unclip_jax.demo.attributes`) reads the result: a case succeeds when the colour it reads is the prompt's
(:func:`measure`; shape accuracy is reported beside it).

Two decoders are compared (:func:`run`): the demo's decoder with RePaint resampling (Lugmayr et al. 2022; any decoder,
no training) at the demo's decoder steps, and GLIDE's inpainting fine-tune of that decoder
(``experiments/decoder_inpaint.py:tiny_inpaint``, started from the demo decoder with its input convolution widened by
zeros: :func:`train_inpainting_decoder`) sampled plainly at **a quarter of those steps**. The upsampler inpaints with
RePaint in both. The report gives both accuracies with their step and network-call counts.

    python -m unclip_jax.demo.inpaint --workdir workdirs/demo

(``make demo`` first: the workdir's clip, prior, decoder, upsampler and classifier.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.input import synthetic

TARGET = 0.8  # the bar: the prompt's colour read in >= 80% of the cases
HOLE = 1.6  # half-side of the square hole in object radii (the object plus a margin)
# The decoder's classifier-free guidance scale while inpainting (the demo samples text-to-image at 3): the hole must
# follow the caption against the surrounding source, which a stronger pull towards the caption (and the prior's z_i)
# helps; RePaint's resampling schedule (Lugmayr et al. 2022 use 10 x 10 over 250 steps; 5 x 5 at 25 steps keeps the
# same share of resampled steps at a tenth of the steps).
DECODER_GUIDANCE = 8.0
JUMP_LENGTH, JUMP_N_SAMPLE = 5, 5


def inpaint_cases(num: int, size: int, seed: int = 1, scenes: str = synthetic.DEFAULT_SCENES) -> dict[str, Any]:
    """``num`` one-object scenes of the dataset with ``seed`` (:data:`~unclip_jax.input.synthetic.SCENES`
    distribution ``scenes``) as inpainting cases at ``size`` pixels.

    Returns:
        dict(source float32 [N, S, S, 3] in [-1, 1] (the scene without its object), mask float32 [N, S, S, 1]
        (0 in the square hole around the object, 1 elsewhere), full uint8 [N, S, S, 3] (the scene with its object),
        captions list[str], attrs {name: [N, ...]} (the scenes' ``attr/*`` arrays, for
        :func:`unclip_jax.demo.attributes.score`)).
    """
    sources, masks, fulls, captions, attrs = [], [], [], [], []
    i = 0
    while len(captions) < num:
        ex = synthetic.example(i, seed, sizes=(size,), scenes=scenes)
        i += 1
        if int(ex["attr/num_objects"]) != 1:
            continue
        scene = {k[5:]: v for k, v in ex.items() if k.startswith("attr/")}
        empty = synthetic.render({**scene, "num_objects": 0}, (size,))[size]
        cy, cx = float(scene["center"][0][1]) * size, float(scene["center"][0][0]) * size
        half = HOLE * float(scene["radius"][0]) * size
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        hole = (np.abs(ys - cy) <= half) & (np.abs(xs - cx) <= half)
        sources.append(empty.astype(np.float32) / 127.5 - 1.0)
        masks.append((~hole).astype(np.float32)[..., None])
        fulls.append(ex["image"])
        captions.append(ex["caption"])
        attrs.append({k: v for k, v in ex.items() if k.startswith("attr/")})
    return dict(
        source=np.stack(sources),
        mask=np.stack(masks),
        full=np.stack(fulls),
        captions=captions,
        attrs={k: np.stack([a[k] for a in attrs]) for k in attrs[0]},
    )


def measure(
    pipe: Any,
    classifier: tuple[Any, Any],
    cases: dict[str, Any],
    *,
    method: str,
    settings: dict[str, Any],
    jump_length: int = JUMP_LENGTH,
    jump_n_sample: int = JUMP_N_SAMPLE,
    batch: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Inpaints every case with ``pipe`` and scores the results with the attribute classifier.

    Returns:
        dict(method, colour / shape accuracy and counts, decoder steps, network calls and guidance scale, seconds,
        images [N, S, S, 3]).
    """
    from unclip_jax.demo import attributes
    from unclip_jax.diffusion.repaint import num_network_calls

    model, variables = classifier
    outs = []
    t0 = time.perf_counter()
    n = len(cases["captions"])
    for i in range(0, n, batch):
        sl = slice(i, min(i + batch, n))
        res = pipe.inpaint(
            cases["source"][sl],
            cases["mask"][sl],
            cases["captions"][sl],
            method=method,
            jump_length=jump_length,
            jump_n_sample=jump_n_sample,
            settings=settings,
            seed=seed + i,
        )
        outs.append(res["images"])
    seconds = time.perf_counter() - t0
    images = np.concatenate(outs)
    scores = attributes.score(attributes.predict(model, variables, images), cases["attrs"], cases["captions"])
    steps = int(settings["decoder"].steps)  # the demo's settings count steps (UnCLIPScheduler spacing)
    calls = num_network_calls(steps, jump_length, jump_n_sample) if method == "repaint" else steps
    return dict(
        method=method,
        colour=scores["colour"],
        shape=scores["shape"],
        decoder_steps=steps,
        decoder_network_calls=calls,
        decoder_guidance=settings["decoder"].guidance_scale,
        jump_length=jump_length if method == "repaint" else None,
        jump_n_sample=jump_n_sample if method == "repaint" else None,
        seconds=round(seconds, 1),
        images=images,
    )


def train_inpainting_decoder(
    workdir: Path, data_folder: Path, steps: int | None = None, out: Path | None = None
) -> Path:
    """GLIDE's inpainting fine-tune of the demo decoder: ``<workdir>/decoder/export/ema`` widened by zeros
    (:func:`unclip_jax.convert.decoder.widen_for_inpainting`) into ``<out>/decoder_inpaint_init``, then
    ``experiments/decoder_inpaint.py:tiny_inpaint`` from it in ``<out>/decoder_inpaint`` (resumable; ``out``
    defaults to ``workdir``).

    Returns:
        the workdir of the fine-tune.
    """
    from unclip_jax import main as main_lib
    from unclip_jax.convert.decoder import widen_for_inpainting
    from unclip_jax.pipeline.loading import workdir_export
    from unclip_jax.train.config_loading import REPO_ROOT

    export = workdir_export(workdir / "decoder")
    if export is None:
        raise ValueError(f"{workdir}/decoder has no export: run make demo first")
    out = Path(out) if out is not None else workdir
    init = out / "decoder_inpaint_init"
    if not init.exists():
        widen_for_inpainting(export, init)
    wd = out / "decoder_inpaint"
    argv = [
        "--config=experiments/decoder_inpaint.py:tiny_inpaint",
        f"--workdir={wd}",
        f"--config.data.folder={data_folder}",
        f"--config.init_from={init}",
    ] + ([f"--config.total_steps={steps}"] if steps else [])
    print("[inpaint] python -m unclip_jax.main " + " ".join(shlex.quote(a) for a in argv), flush=True)
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)
        code = main_lib.main(["python -m unclip_jax.main", *argv])
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"training the inpainting decoder failed with exit code {code}")
    return wd


def run(
    workdir: Path,
    num: int = 64,
    finetune_steps: int | None = None,
    out: Path | None = None,
    decoder_guidance: float = DECODER_GUIDANCE,
) -> dict[str, Any]:
    """The measurement on a demo workdir (see the module docstring); writes the fine-tune, ``report.json``,
    ``report.md`` and ``grid.png`` (source with the hole, RePaint, fine-tuned decoder; the first 8 cases) to ``out``
    (default ``<workdir>/inpaint``) and returns the report. The demo profile's sampling settings are used, with the
    decoder's guidance scale ``decoder_guidance`` for both decoders."""
    from unclip_jax.demo import attributes
    from unclip_jax.pipeline import DEFAULT_SETTINGS
    from unclip_jax.pipeline import images as images_lib
    from unclip_jax.pipeline.loading import load_component, load_pipeline

    workdir = Path(workdir)
    out = Path(out) if out is not None else workdir / "inpaint"
    out.mkdir(parents=True, exist_ok=True)
    demo = json.loads((workdir / "demo.json").read_text()) if (workdir / "demo.json").is_file() else {}
    from unclip_jax.demo.profiles import PROFILES

    profile = PROFILES[demo.get("profile", "full")]
    settings = {k: dataclasses.replace(DEFAULT_SETTINGS[k], **v) for k, v in profile.sample_settings.items()}
    settings["decoder"] = dataclasses.replace(settings["decoder"], guidance_scale=decoder_guidance)
    paths = {
        "text_encoder": workdir / "clip",
        "image_encoder": workdir / "clip",
        "prior": workdir / "prior",
        "decoder": workdir / "decoder",
        "super_res_first": workdir / "upsampler",
    }
    pipe = load_pipeline(paths=paths, require=tuple(paths))
    classifier = attributes.load_classifier(workdir / "classifier")
    size = int(pipe.component("super_res_first").module.sample_size)
    cases = inpaint_cases(num, size, scenes=profile.scenes)
    images_lib.save_png(cases["source"][0], out / "source.png")  # case 0 for `unclip inpaint` (README)
    images_lib.save_png(np.repeat(cases["mask"][0] * 2.0 - 1.0, 3, axis=-1), out / "mask.png")
    report: dict[str, Any] = dict(
        num_cases=num, size=size, target=TARGET, decoder_guidance=decoder_guidance, prompts=cases["captions"][:8]
    )

    repaint = measure(pipe, classifier, cases, method="repaint", settings=settings)
    report["repaint"] = {k: v for k, v in repaint.items() if k != "images"}
    print(f"[inpaint] RePaint: colour {repaint['colour']['accuracy']:.3f}", flush=True)

    wd = train_inpainting_decoder(workdir, workdir / "data" / "embed_train_64", finetune_steps, out)
    pipe.components["decoder"], _ = load_component("decoder", wd, own_folder=True)
    quarter = max(1, int(settings["decoder"].steps) // 4)
    model_settings = {**settings, "decoder": dataclasses.replace(settings["decoder"], steps=quarter)}
    model = measure(pipe, classifier, cases, method="model", settings=model_settings)
    report["model"] = {k: v for k, v in model.items() if k != "images"}
    print(f"[inpaint] fine-tuned decoder: colour {model['colour']['accuracy']:.3f}", flush=True)
    report["finetune_workdir"] = str(wd)
    report["repaint_meets_target"] = repaint["colour"]["accuracy"] >= TARGET
    report["model_meets_target"] = model["colour"]["accuracy"] >= TARGET
    report["model_at_least_repaint"] = model["colour"]["accuracy"] >= repaint["colour"]["accuracy"]

    k = min(8, num)
    shown = np.where(cases["mask"][:k] >= 0.5, cases["source"][:k], 0.0)
    rows = np.concatenate([shown, repaint["images"][:k], model["images"][:k]])
    labels = [f"{c} (hole)" for c in cases["captions"][:k]] + ["RePaint"] * k + ["fine-tuned"] * k
    images_lib.save_png(images_lib.make_grid(rows, labels=labels, ncols=k), out / "grid.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    lines = [
        f"Inpainting on {report['num_cases']} one-object scenes at {report['size']}x{report['size']} "
        f"(an object drawn into an empty masked square under its caption; target: colour >= {report['target']:.0%})"
        + (f"; decoder guidance {report['decoder_guidance']:g}" if report.get("decoder_guidance") is not None else ""),
        "",
        "| decoder | decoder steps | decoder network calls | colour accuracy | shape accuracy | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("repaint", "demo decoder + RePaint"), ("model", "GLIDE inpainting fine-tune")):
        r = report.get(key)
        if r is None:
            continue
        jumps = f" (jumps {r['jump_length']} x {r['jump_n_sample']})" if r.get("jump_length") else ""
        lines.append(
            f"| {name} | {r['decoder_steps']}{jumps} | {r['decoder_network_calls']} | "
            f"{r['colour']['accuracy']:.3f} ({r['colour']['correct']}/{r['colour']['total']}) | "
            f"{r['shape']['accuracy']:.3f} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unclip_jax.demo.inpaint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a demo workdir (make demo)")
    parser.add_argument("--num", type=int, default=64, help="inpainting cases")
    parser.add_argument(
        "--finetune-steps", type=int, default=0, help="inpainting fine-tune steps (0: the experiment's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="fine-tune and report folder (default <workdir>/inpaint)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=DECODER_GUIDANCE, help="decoder guidance scale of both decoders"
    )
    args = parser.parse_args(argv)
    from unclip_jax.convert.paths import check_input, check_output_folder

    try:  # before any model loads: a missing demo workdir, a bad count, an unwritable --out
        check_input(args.workdir, "--workdir")
        if args.num < 1 or args.finetune_steps < 0:
            raise ValueError(f"--num {args.num} / --finetune-steps {args.finetune_steps}: expected >= 1 / >= 0")
        if not args.guidance_scale >= 0:
            raise ValueError(f"--guidance-scale {args.guidance_scale}: expected >= 0")
        check_output_folder(args.out if args.out is not None else args.workdir / "inpaint", "--out")
    except ValueError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    report = run(args.workdir, args.num, args.finetune_steps or None, args.out, args.guidance_scale)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
