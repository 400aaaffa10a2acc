"""nice -n 19 python tools/train_parity_long.py --workdir=workdirs/train_parity_long --seeds=0,1

The demo's decoder trained to the demo's length by us and by PyTorch, from the same start with independent noise
(issue 18): are the loss curves within the seed-to-seed spread?

1. The demo's data, CLIP, CLIP embeddings and attribute classifier (``unclip_jax.demo`` stages ``data``, ``clip``,
   ``embed``, ``classifier``; resumable, ``--profile=fast`` for a smoke run) give the decoder's training folder.
2. One initial decoder (``experiments/decoder.py:tiny``, or the profile's variant) is written once as a native folder
   (our side starts from it through ``config.init_from``) and through the bridge as diffusers folders (PyTorch).
3. For each seed: our side is ``unclip_jax.train.loop.train_and_evaluate`` (what the demo runs) with
   ``config.seed = seed``; the PyTorch side (``tools/torch_unclip.py``) reads the same input pipeline with the same
   seed (same batches) and draws its own timesteps, noise and drop masks from ``torch.Generator(seed)``.
4. Loss curves (means over ``config.log_every`` steps), final losses and their seed-to-seed spread are printed and
   written to ``<workdir>/train_parity_long.json``.
5. Each run's EMA decoder (PyTorch's read back through the bridge) samples one image per validation caption given
   that validation image's own CLIP embedding (the demo's "decoder given the real z_i"; the task's preview sampler,
   no guidance, the same seed for every run) and the demo's attribute classifier scores them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
for _path in (TOOLS.parent, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SPEC = "experiments/decoder.py"


def prepare_data(workdir: Path, profile_name: str) -> Path:
    """The demo's stages up to the embeddings (skipped when done); returns the decoder's training folder."""
    from unclip_jax.demo import runner, stages
    from unclip_jax.demo.profiles import PROFILES

    ctx = runner.Context(workdir / "demo", PROFILES[profile_name])
    runner.run_stages(ctx, [s for s in stages.stages() if s.name in ("data", "clip", "embed", "classifier")])
    return ctx.path("data", "embed_train_64")


def experiment(profile_name: str, data: Path, seed: int, steps: int, start: Path | None) -> Any:
    from unclip_jax.demo.profiles import PROFILES
    from unclip_jax.train.config_loading import load_experiment

    profile = PROFILES[profile_name]
    over = {**profile.overrides.get("decoder", {}), "data.folder": str(data), "seed": seed}
    over["checkpoint.every"] = 10**9
    if steps:
        over["total_steps"] = steps
    if start is not None:
        over["init_from"] = str(start)
    return load_experiment(f"{SPEC}:{profile.variant}", over)


def write_start(config: Any, folder: Path) -> tuple[Path, Path]:
    """Our initial decoder (``PRNGKey(0)``) as a native folder and as a diffusers pipeline folder."""
    import flax.linen as nn
    import jax

    from unclip_jax import stages
    from unclip_jax.convert import registry
    from unclip_jax.convert.native import save_native
    from unclip_jax.train import loop
    from unclip_jax.train.tasks import make_task

    native, torch_dir = folder / "native", folder / "diffusers"
    if native.is_dir() and torch_dir.is_dir():
        return native, torch_dir
    task = make_task(config)
    batch = loop.peek(loop.make_train_iterator(config))
    variables = jax.jit(lambda b: nn.unbox(task.init(jax.random.PRNGKey(0), b)))(batch)
    variables = jax.device_get(variables)
    save_native(task.module, variables, native)
    converter = registry.for_component(stages.task("decoder").component)
    converter.save(task.module, variables, converter.pipeline_path(torch_dir))
    return native, torch_dir


def run_ours(config: Any, workdir: Path) -> list[dict[str, float]]:
    """Our training (the demo's): ``train_and_evaluate``; returns the ``metrics.jsonl`` rows with a loss."""
    from unclip_jax.train import loop
    from unclip_jax.train.metrics import read_jsonl

    metrics = workdir / "metrics.jsonl"
    if not (workdir / "done").exists():
        loop.train_and_evaluate(config, str(workdir))
        (workdir / "done").write_text("")
    return [{"step": r["step"], "loss": r["train/loss"]} for r in read_jsonl(metrics) if "train/loss" in r]


def run_torch(config: Any, start: Path, workdir: Path, seed: int, log) -> list[dict[str, float]]:
    """The PyTorch side on the same batches with its own draws; returns mean losses per ``config.log_every`` steps."""
    import torch
    from torch_unclip import TorchDecoder, TorchDiffusion, TorchTrainer, draws_like

    from unclip_jax.train import loop
    from unclip_jax.train.tasks import make_task

    out = workdir / "losses.json"
    if out.exists():
        return json.loads(out.read_text())
    task = make_task(config)  # only for the null caption the task reads from the data folder
    model = TorchDecoder(start, task.null_caption)
    trainer = TorchTrainer(model, TorchDiffusion(config.diffusion), config)
    gen = torch.Generator().manual_seed(seed)
    probs = {
        "drop_image_embeds": float(config.task.drop_image_prob),
        "drop_caption": float(config.task.drop_caption_prob),
    }
    data = loop.make_train_iterator(config)
    every, rows, window, t0 = int(config.log_every), [], [], time.perf_counter()
    for step in range(1, int(config.total_steps) + 1):
        batch = {k: np.asarray(v) for k, v in next(data).items()}
        draws = draws_like(batch["image"].shape, trainer.diffusion.num_timesteps, probs, gen)
        window.append(trainer.train_step(batch, draws)["loss"])
        if step % every == 0 or step == int(config.total_steps):
            rows.append({"step": step, "loss": float(np.mean(window))})
            window = []
            log(f"  torch seed {seed} step {step}: loss {rows[-1]['loss']:.4f} ({time.perf_counter() - t0:.0f}s)")
    workdir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # the EMA weights as diffusers folders (read back through the bridge for sampling)
        for k, v in trainer.ema.items():
            model.params[k].copy_(v)
    model.unet.save_pretrained(workdir / "ema" / "decoder")
    model.proj.save_pretrained(workdir / "ema" / "text_proj")
    out.write_text(json.dumps(rows))
    return rows


def validation_set(workdir: Path, n: int) -> dict[str, Any]:
    """The first ``n`` validation scenes: uint8 images, captions, attributes and their demo-CLIP encodings."""
    from unclip_jax.convert.native import load_native
    from unclip_jax.input import precompute, sources
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.pipeline.loading import workdir_export

    src = sources.ShardSource(str(workdir / "demo" / "data" / "val_64"))
    exs = [ex for _, item in src.iter_items(0, min(n, len(src))) if not isinstance(item, Exception) for ex in item][:n]
    images = np.stack([ex["image"] for ex in exs]).astype(np.uint8)
    captions = [str(ex["caption"]) for ex in exs]
    attrs = {k: np.stack([ex[k] for ex in exs]) for k in exs[0] if k.startswith("attr/")}
    clip_model, clip_vars = load_native(workdir_export(workdir / "demo" / "clip"))
    text_fn, image_fn = precompute.clip_encoders(clip_model, clip_vars)
    ids, mask = ClipTokenizer()(captions)
    t = text_fn(np.asarray(ids, np.int32))
    return dict(
        images=images,
        captions=captions,
        attrs=attrs,
        image_embeds=np.asarray(image_fn(images)["image_embeds"], np.float32),
        text_embeds=np.asarray(t["text_embeds"], np.float32),
        text_hidden_states=np.asarray(t["last_hidden_state"], np.float32),
        text_mask=np.asarray(mask, bool),
    )


def attribute_accuracy(config: Any, decoder_folder: Path, val: dict[str, Any], classifier: Path) -> dict[str, float]:
    """Samples one image per validation scene with the decoder in ``decoder_folder`` (native or diffusers) given the
    scene's own CLIP embeddings, and scores colour / shape / ... with the demo's attribute classifier."""
    import jax
    import jax.numpy as jnp

    from unclip_jax import stages
    from unclip_jax.convert import native, registry
    from unclip_jax.demo import attributes
    from unclip_jax.pipeline import resize
    from unclip_jax.train.tasks import make_task

    if native.is_native(decoder_folder):
        _, variables = native.load_native(decoder_folder)
    else:
        _, variables = registry.for_component(stages.task("decoder").component).load(decoder_folder)
    task = make_task(config)
    size = int(config.data.image_size)
    real = resize(jnp.asarray(val["images"], jnp.float32) / 127.5 - 1.0, size)
    batch = {k: jnp.asarray(val[k]) for k in ("image_embeds", "text_embeds", "text_hidden_states", "text_mask")}
    batch["image"] = real
    out = jax.jit(lambda p, b: task.sample(p, b, jax.random.PRNGKey(123), {}))(variables["params"], batch)
    gen = np.asarray(out["images"])[len(real) :]  # [N, size, size, 3] in [0, 1]
    gen64 = np.asarray(resize(jnp.asarray(gen) * 2.0 - 1.0, val["images"].shape[1]))
    gen_u8 = np.clip(np.round((gen64 + 1.0) * 127.5), 0, 255).astype(np.uint8)
    model, cvars = attributes.load_classifier(classifier)
    acc = attributes.score(attributes.predict(model, cvars, gen_u8), val["attrs"], val["captions"])
    return {k: v["accuracy"] for k, v in acc.items()}


def summary(curves: dict[str, list[dict[str, float]]], tail: int) -> dict[str, Any]:
    """Mean loss over the last ``tail`` logged windows per run, per side mean and spread."""
    finals = {k: float(np.mean([r["loss"] for r in v[-tail:]])) for k, v in curves.items()}
    sides = {}
    for side in ("ours", "torch"):
        vals = [v for k, v in finals.items() if k.startswith(side)]
        sides[side] = {"mean": float(np.mean(vals)), "spread": float(np.max(vals) - np.min(vals)) if vals else math.nan}
    return {"final_loss": finals, "sides": sides}


def table(curves: dict[str, list[dict[str, float]]]) -> str:
    names = sorted(curves)
    lines = ["| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    steps = [r["step"] for r in curves[names[0]]]
    by = {k: {r["step"]: r["loss"] for r in v} for k, v in curves.items()}
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{by[k].get(s, math.nan):.4f}" for k in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="workdirs/train_parity_long")
    p.add_argument("--profile", default="full", help="demo profile: full (the demo's tiny decoder) or fast (smoke)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=0, help="0 = the experiment's total_steps (the demo's length)")
    p.add_argument("--sides", default="ours,torch", help="'' = prepare only; finished runs are read back, not re-run")
    p.add_argument("--torch_threads", type=int, default=1)
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="attribute accuracy")
    args = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.torch_threads)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    workdir = Path(args.workdir).resolve()
    data = prepare_data(workdir, args.profile)
    seeds = [int(s) for s in args.seeds.split(",")]
    native, torch_dir = write_start(experiment(args.profile, data, 0, args.steps, None), workdir / "start")
    log(f"start weights: {native}, {torch_dir}")
    curves: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        config = experiment(args.profile, data, seed, args.steps, native)
        for side in [s for s in args.sides.split(",") if s]:
            log(f"{side} seed {seed}: {config.total_steps} steps")
            t = time.perf_counter()
            wd = workdir / f"{side}_seed{seed}"
            if side == "ours":
                curves[f"ours_seed{seed}"] = run_ours(config, wd)
            else:
                curves[f"torch_seed{seed}"] = run_torch(config, torch_dir, wd, seed, log)
            log(
                f"{side} seed {seed}: final window loss {curves[f'{side}_seed{seed}'][-1]['loss']:.4f} "
                f"({time.perf_counter() - t:.0f}s)"
            )
            result = {"profile": args.profile, "curves": curves, **summary(curves, tail=5)}
            (workdir / "train_parity_long.json").write_text(json.dumps(result, indent=1))
    if not curves:
        return 0
    print(table(curves))
    result = {"profile": args.profile, "curves": curves, **summary(curves, tail=5)}
    if args.eval:
        from unclip_jax.demo.profiles import PROFILES

        val = validation_set(workdir, PROFILES[args.profile].n_eval)
        config = experiment(args.profile, data, 0, args.steps, native)
        accuracy = {}
        for name in curves:
            folder = workdir / name / ("export/ema" if name.startswith("ours") else "ema")
            accuracy[name] = attribute_accuracy(config, folder, val, workdir / "demo" / "classifier")
            log(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy[name].items()))
        result["attribute_accuracy"] = accuracy
        (workdir / "train_parity_long.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
