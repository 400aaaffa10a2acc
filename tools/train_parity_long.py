"""nice -n 19 python tools/train_parity_long.py --workdir=workdirs/train_parity_long --seeds=0,1

The demo's decoder trained to the demo's length by us and by PyTorch, from the same start with independent noise
(issue 18): are the loss curves within the seed-to-seed spread?

1. The demo's data, CLIP and CLIP embeddings (``unclip_jax.demo`` stages ``data``, ``clip``, ``embed``; resumable,
   ``--profile=fast`` for a smoke run) give the decoder's training folder.
2. One initial decoder (``experiments/decoder.py:tiny``, or the profile's variant) is written once as a native folder
   (our side starts from it through ``config.init_from``) and through the bridge as diffusers folders (PyTorch).
3. For each seed: our side is ``unclip_jax.train.loop.train_and_evaluate`` (what the demo runs) with
   ``config.seed = seed``; the PyTorch side (``tools/torch_unclip.py``) reads the same input pipeline with the same
   seed (same batches) and draws its own timesteps, noise and drop masks from ``torch.Generator(seed)``.
4. Loss curves (means over ``config.log_every`` steps), final losses and their seed-to-seed spread are printed and
   written to ``<workdir>/train_parity_long.json``.
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
    runner.run_stages(ctx, [s for s in stages.stages() if s.name in ("data", "clip", "embed")])
    return ctx.path("data", "embed_train_64")


def experiment(profile_name: str, data: Path, seed: int, steps: int, start: Path | None) -> Any:
    from unclip_jax.demo.profiles import PROFILES
    from unclip_jax.train.config_loading import load_experiment

    profile = PROFILES[profile_name]
    over = {**profile.overrides.get("decoder", {}), "data.folder": str(data), "seed": seed}
    over.update({"checkpoint.every": 10**9, "export.at_end": False})
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
    out.write_text(json.dumps(rows))
    return rows


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
    p.add_argument("--sides", default="ours,torch")
    p.add_argument("--torch_threads", type=int, default=1)
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
        for side in args.sides.split(","):
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
    print(table(curves))
    print(json.dumps(summary(curves, tail=5), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
