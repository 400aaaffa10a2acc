"""python tools/train_parity.py --stage=both --steps=20 --out=workdirs/train_parity

A differential training run against diffusers/PyTorch (issue 18): does our training produce what the PyTorch
reference produces, step for step?

For the decoder (:class:`unclip_jax.models.decoder.UnCLIPDecoder` = diffusers ``UNet2DConditionModel`` +
``UnCLIPTextProjModel``) and the diffusion prior (diffusers ``PriorTransformer``):

1. the experiment config (``experiments/decoder.py:test`` / ``experiments/prior.py:test`` through
   :func:`unclip_jax.train.config_loading.load_experiment`, with a warm-up + cosine schedule and EMA warm-up switched
   on so that every part of the recipe is exercised) builds our task and its initial state;
2. the initial weights are exported through the weight bridge (``unclip_jax.convert``'s save functions) and loaded
   into the diffusers modules;
3. both sides train on the same batches with the same timesteps, noise and classifier-free-guidance drop masks:
   the draws are recorded from our task (``task.draws(fold_in(base_rng, step), batch)``, exactly what our train step
   uses) and replayed in PyTorch;
4. our side is the project's own train step (:func:`unclip_jax.train.loop.make_train_step`: task loss, optax AdamW,
   clipping, schedule, EMA); the PyTorch side (``tools/torch_unclip.py``) is written independently: guided-diffusion's
   ``training_losses`` (``q_sample``, eps / x0 / v targets, the VLB term with learned-range variance and a
   stop-gradient on the mean, Improved DDPM section 3.1), ``torch.optim.AdamW`` with decay on matrices only,
   ``torch.nn.utils.clip_grad_norm_``, a ``LambdaLR`` warm-up + cosine schedule and an EMA with the
   ``min(decay, (1 + n) / (10 + n))`` warm-up.

Printed (and written to ``<out>/train_parity.json``): step-1 loss and the max over parameters of
``||g_ours - g_torch|| / ||g_torch||``; then per step the loss of each side, the max relative difference of the
parameters and of their EMA, and the relative difference of the accumulated update ``p_t - p_0``.

The PyTorch side's parameter names are the diffusers state-dict names (``decoder.*``, ``text_proj.*``, ``prior.*``);
ours are mapped to them by exporting through the same bridge. The prior's learned null caption
(``learned_null_text``: no diffusers equivalent) is two extra PyTorch parameters ``null.*`` initialised from ours.
PyTorch runs on ``--torch_threads`` threads (1 by default, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
for _path in (TOOLS.parent, TOOLS):  # the repository (unclip_jax, experiments) and tools/torch_unclip.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SPECS = {"decoder": "experiments/decoder.py:test", "prior": "experiments/prior.py:test"}
# On top of the experiment: every part of the recipe switched on (warm-up + cosine decay, EMA warm-up).
RECIPE = {"optim.warmup_steps": 3, "optim.schedule": "cosine", "ema.warmup": True}
DECODER_TEXT_LEN = 8
NULL_PARAMS = ("null_text_embedding", "null_encoder_hidden_states")
# Parameters whose exact gradient is zero: the prior's self-attention key bias b adds q.b to every logit of a query,
# which softmax ignores. Their computed gradients are rounding noise on both sides (and Adam turns noise into
# lr-sized steps), so they are reported on their own and kept out of the maxima. (The decoder's key bias acts on the
# image tokens only, its text keys have their own bias, so it has a true gradient.)
ZERO_GRADIENT = re.compile(r"^prior\.transformer_blocks\.\d+\.attn1\.to_k\.bias$")


# ------------------------------------------------------------------------------------------------ inputs
def write_condition_files(stage: str, folder: Path, dim: int, length: int, seed: int) -> dict[str, str]:
    """A prior ``stats`` .npz (CLIP mean/std) and a decoder null caption .npz; returns the config overrides."""
    rng = np.random.default_rng(seed + 1000)
    if stage == "prior":
        path = folder / "image_embed_stats.npz"
        mean = (0.3 * rng.standard_normal(dim)).astype(np.float32)
        std = rng.uniform(0.5, 1.5, dim).astype(np.float32)
        np.savez(path, mean=mean, std=std)
        return {"task.stats": str(path)}
    path = folder / "null_caption.npz"
    mask = np.zeros((1, length), bool)
    mask[:, :2] = True
    np.savez(
        path,
        text_embeds=rng.standard_normal((1, dim)).astype(np.float32),
        text_hidden_states=rng.standard_normal((1, length, dim)).astype(np.float32),
        text_mask=mask,
    )
    return {"task.null_caption": str(path)}


def make_batch(stage: str, module: Any, batch_size: int, image_size: int, rng: np.random.Generator) -> dict:
    """One synthetic batch of the stage's input pipeline (captions of random lengths)."""
    d = module.clip_embeddings_dim if stage == "decoder" else module.embedding_dim
    length = DECODER_TEXT_LEN if stage == "decoder" else module.num_embeddings
    lengths = rng.integers(1, length + 1, batch_size)
    batch = dict(
        image_embeds=rng.standard_normal((batch_size, d)).astype(np.float32),
        text_embeds=rng.standard_normal((batch_size, d)).astype(np.float32),
        text_hidden_states=rng.standard_normal((batch_size, length, d)).astype(np.float32),
        text_mask=np.arange(length)[None, :] < lengths[:, None],
    )
    if stage == "decoder":
        batch["image"] = rng.integers(0, 256, (batch_size, image_size, image_size, 3)).astype(np.uint8)
    return batch


# ------------------------------------------------------------------------------------------------ the bridge
def export_named(stage: str, module: Any, tree: dict, extra: dict, folder: Path) -> dict[str, np.ndarray]:
    """A params-shaped tree (params, EMA or gradients) as PyTorch-named arrays: written by the task's converter
    (:func:`unclip_jax.convert.registry.for_component`) to a pipeline folder and read back, named
    ``<pipeline subfolder>.<state-dict key>``; the prior's learned null caption goes to ``null.*``."""
    from unclip_jax import stages
    from unclip_jax.convert import io, registry

    converter = registry.for_component(stages.task(stage).component)
    nulls = {k: np.asarray(tree[k]) for k in NULL_PARAMS if k in tree}
    params = {k: v for k, v in tree.items() if k not in NULL_PARAMS}
    converter.save(module, {"params": params, **extra}, converter.pipeline_path(folder))
    out: dict[str, np.ndarray] = {}
    for sub in converter.folders:
        state = io.read_safetensors(io.find_weights(folder / sub))
        out.update({f"{sub}.{k}": v for k, v in state.items() if k not in ("clip_mean", "clip_std")})
    out.update({"null." + k[len("null_") :]: v for k, v in nulls.items()})
    return out


class NameMap:
    """Our params-shaped trees -> diffusers-named arrays, learned from ONE export through the bridge.

    The probe is a tree whose leaves hold consecutive integers (exact in float32 below 2**24); each exported tensor
    then names the leaf it came from and the permutation (transpose / reshape) the bridge applied, so later trees
    (params, EMA, gradients) are mapped without writing files. Every exported value must come from exactly one leaf.
    """

    def __init__(self, stage: str, module: Any, template: dict, extra: dict, folder: Path):
        import jax

        leaves, self.treedef = jax.tree_util.tree_flatten(template)
        sizes = [int(np.size(x)) for x in leaves]
        self.offsets = np.cumsum([0] + sizes)
        if self.offsets[-1] >= 2**24:
            raise ValueError(f"NameMap: {self.offsets[-1]} values do not fit float32 integers")
        probe = [
            np.arange(o, o + n, dtype=np.float32).reshape(np.shape(x)) for o, n, x in zip(self.offsets, sizes, leaves)
        ]
        exported = export_named(stage, module, jax.tree_util.tree_unflatten(self.treedef, probe), extra, folder)
        self.index: dict[str, tuple[int, np.ndarray, tuple]] = {}
        seen = np.zeros(self.offsets[-1], bool)
        for name, arr in exported.items():
            flat = np.asarray(arr).astype(np.int64).ravel()
            leaf = int(np.searchsorted(self.offsets, flat[0], side="right") - 1)
            local = flat - self.offsets[leaf]
            if local.min() < 0 or local.max() >= sizes[leaf] or seen[flat].any():
                raise AssertionError(f"NameMap: exported {name} is not a permutation of one parameter")
            seen[flat] = True
            self.index[name] = (leaf, local, np.shape(arr))
        if not seen.all():
            raise AssertionError(f"NameMap: {int((~seen).sum())} parameter values were not exported")

    def __call__(self, tree: Any) -> dict[str, np.ndarray]:
        import jax

        leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(jax.device_get(tree))]
        return {k: leaves[i][local].reshape(shape) for k, (i, local, shape) in self.index.items()}


# ------------------------------------------------------------------------------------------------ comparison
def rel(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` in float64 (0 when both are zero)."""
    b = np.asarray(b, np.float64).ravel()
    num = float(np.linalg.norm(np.asarray(a, np.float64).ravel() - b))
    den = float(np.linalg.norm(b))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def max_rel(
    ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], zero_gradient: bool = False
) -> tuple[float, str]:
    """The largest per-parameter :func:`rel` and its parameter name (same names and shapes required) over the
    parameters with a gradient, or with ``zero_gradient`` over the :data:`ZERO_GRADIENT` ones."""
    if set(ours) != set(theirs):
        raise AssertionError(
            f"parameter names differ: ours only {set(ours) - set(theirs)}, theirs only {set(theirs) - set(ours)}"
        )
    worst, name = 0.0, ""
    for k, b in theirs.items():
        a = ours[k]
        if bool(ZERO_GRADIENT.match(k)) != zero_gradient:
            continue
        if a.shape != b.shape:
            raise AssertionError(f"{k}: shape {a.shape} (ours, exported) vs {b.shape} (diffusers)")
        r = rel(a, b)
        if r >= worst:
            worst, name = r, k
    return worst, name


def update_rel(ours: dict, theirs: dict, start: dict) -> float:
    """``||(p_o - p_0) - (p_t - p_0)|| / ||p_t - p_0||`` over all parameters with a gradient together (the
    accumulated update)."""
    keys = [k for k in theirs if not ZERO_GRADIENT.match(k)]
    num = sum(float(np.sum((ours[k].astype(np.float64) - theirs[k]) ** 2)) for k in keys)
    den = sum(float(np.sum((theirs[k].astype(np.float64) - start[k]) ** 2)) for k in keys)
    return math.sqrt(num / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------ the run
def run_parity(stage: str, steps: int = 20, seed: int = 0, log=print) -> dict[str, Any]:
    """Trains ours and diffusers' ``stage`` side by side for ``steps`` steps; returns the measurements."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch
    from torch_unclip import TorchDecoder, TorchDiffusion, TorchPrior, TorchTrainer

    from unclip_jax.train import loop, optim
    from unclip_jax.train.config_loading import load_experiment
    from unclip_jax.train.tasks import make_task

    with tempfile.TemporaryDirectory(prefix=f"train_parity_{stage}_") as tmp:
        tmp = Path(tmp)
        spec = SPECS[stage]
        probe = load_experiment(spec)
        from unclip_jax.models import decoder as decoder_models
        from unclip_jax.models import prior as prior_models

        dim = (decoder_models.VARIANTS if stage == "decoder" else prior_models.VARIANTS)[probe.model.variant]
        dim = dim.get("clip_embeddings_dim", dim.get("embedding_dim"))
        overrides = {**RECIPE, "total_steps": steps, "seed": seed}
        overrides.update(write_condition_files(stage, tmp, dim, DECODER_TEXT_LEN, seed))
        config = load_experiment(spec, overrides)
        task = make_task(config)
        rng = np.random.default_rng(seed)
        batches = [
            make_batch(stage, task.module, int(config.batch_size), int(config.data.image_size), rng)
            for _ in range(steps)
        ]

        # Ours: the project's initial state and train step.
        tx, schedule = optim.make_optimizer(config.optim, steps)
        init_rng, base_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
        state = jax.jit(lambda r, b: nn.unbox(loop.make_init_fn(task, tx)(r, b)))(init_rng, batches[0])
        train_step = jax.jit(
            loop.make_train_step(
                task,
                tx,
                schedule,
                base_rng=base_rng,
                ema_decay=float(config.ema.decay),
                ema_warmup=bool(config.ema.warmup),
            )
        )
        draws_fn = jax.jit(task.draws)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b, d: task.loss_from_draws(p, b, d, state.extra)[0]))

        extra = jax.device_get(state.extra)
        export = NameMap(stage, task.module, jax.device_get(state.params), extra, tmp / "probe")

        # Theirs: the diffusers modules loaded from our exported initial weights.
        start = export_named(stage, task.module, jax.device_get(state.params), extra, tmp / "init")
        if set(start) != set(export.index) or any(
            not np.array_equal(export(state.params)[k], v) for k, v in start.items()
        ):
            raise AssertionError("NameMap disagrees with the bridge's export of the initial weights")
        if stage == "decoder":
            torch_model = TorchDecoder(tmp / "init", task.null_caption)
        else:
            null = {k: np.asarray(state.params[k]) for k in NULL_PARAMS if k in state.params}
            torch_model = TorchPrior(tmp / "init", null)
        trainer = TorchTrainer(torch_model, TorchDiffusion(config.diffusion), config)
        ours0, _ = max_rel(start, trainer.named("params"))
        log(
            f"{stage}: {len(start)} parameter tensors, {sum(v.size for v in start.values())} values; "
            f"exported vs loaded max rel diff {ours0:.1e}"
        )

        draws = [
            {k: np.array(v) for k, v in draws_fn(jax.random.fold_in(base_rng, i), batches[i]).items()}
            for i in range(steps)
        ]

        def compare_grads(params: Any, batch: dict, d: dict) -> dict[str, Any]:
            """Loss and gradients of both sides at the same weights (the PyTorch side already holds them)."""
            loss_o, grads_o = grad_fn(params, batch, {k: jnp.asarray(v) for k, v in d.items()})
            loss_t, grads_t = trainer.grads(batch, d)
            g_named = export(grads_o)
            g_rel, g_name = max_rel(g_named, grads_t)
            return dict(
                loss_ours=float(loss_o),
                loss_torch=loss_t,
                loss_rel=abs(float(loss_o) - loss_t) / abs(loss_t),
                grad_max_rel=g_rel,
                grad_max_rel_param=g_name,
                grad_norm_ours=norm(g_named.values()),
                grad_norm_torch=norm(grads_t.values()),
                param_tensors=len(grads_t),
                params_with_gradient=sum(1 for g in grads_t.values() if np.any(g)),
                zero_gradient_params=sorted(k for k in grads_t if ZERO_GRADIENT.match(k)),
                zero_gradient_norm_ours=norm(v for k, v in g_named.items() if ZERO_GRADIENT.match(k)),
                zero_gradient_norm_torch=norm(v for k, v in grads_t.items() if ZERO_GRADIENT.match(k)),
                t=[int(x) for x in d["t"]],
            )

        # Step 1: loss and gradients at the shared initial weights.
        t0 = time.perf_counter()
        step1 = compare_grads(state.params, batches[0], draws[0])

        rows = []
        for i in range(steps):
            state, m = train_step(state, batches[i])
            mt = trainer.train_step(batches[i], draws[i])
            p_o, e_o = export(state.params), export(state.ema_params)
            p_t, e_t = trainer.named("params"), trainer.named("ema")
            p_rel, p_name = max_rel(p_o, p_t)
            e_rel, _ = max_rel(e_o, e_t)
            z_rel, _ = max_rel(p_o, p_t, zero_gradient=True)
            rows.append(
                dict(
                    step=i + 1,
                    lr_ours=float(m["train/lr"]),
                    lr_torch=mt["lr"],
                    loss_ours=float(m["train/loss"]),
                    loss_torch=mt["loss"],
                    loss_rel=abs(float(m["train/loss"]) - mt["loss"]) / abs(mt["loss"]),
                    grad_norm_ours=float(m["train/grad_norm"]),
                    grad_norm_torch=mt["grad_norm"],
                    param_max_rel=p_rel,
                    param_max_rel_name=p_name,
                    ema_max_rel=e_rel,
                    update_rel=update_rel(p_o, p_t, start),
                    zero_gradient_param_max_rel=z_rel,
                    t=[int(x) for x in draws[i]["t"]],
                )
            )
        # Gradients once more where every parameter has one (our decoder's output layer starts at zero, so at step 1
        # only it does): our step-N weights copied into PyTorch, timesteps including 0 (the decoder NLL L_0) and T-1.

        with torch.no_grad():
            for k, v in export(state.params).items():
                trainer.model.params[k].copy_(torch.from_numpy(v))
        edge = dict(draws[0])
        t_edge = np.array(draws[0]["t"])
        t_edge[:4] = [0, 1, trainer.diffusion.num_timesteps - 1, trainer.diffusion.num_timesteps // 2]
        edge["t"] = t_edge
        final = compare_grads(state.params, batches[0], edge)
        seconds = time.perf_counter() - t0
        drawn = dict(
            t_min=int(min(d["t"].min() for d in draws)),
            t_max=int(max(d["t"].max() for d in draws)),
            examples=int(sum(d["t"].size for d in draws)),
            **{k: int(sum(d[k].sum() for d in draws)) for k in draws[0] if k.startswith("drop_")},
        )
    return dict(
        stage=stage,
        config=spec,
        overrides={k: v for k, v in overrides.items() if not k.startswith("task.")},
        seed=seed,
        torch_version=torch.__version__,
        jax_version=jax.__version__,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        draws=drawn,
        step1=step1,
        steps=rows,
        final_grads=final,
        seconds=seconds,
    )


def norm(arrays: Any) -> float:
    """The global (float64) norm of some arrays."""
    return math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in arrays))


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (step 1 gradients, then one row per step)."""
    s1 = result["step1"]
    lines = [
        f"**{result['stage']}** ({result['config']} + {result['overrides']}): step 1 loss {s1['loss_ours']:.6f} "
        f"(ours) / {s1['loss_torch']:.6f} (PyTorch), rel diff {s1['loss_rel']:.1e}; gradients max rel diff "
        f"{s1['grad_max_rel']:.1e} ({s1['grad_max_rel_param']}), grad norm {s1['grad_norm_ours']:.5f} / "
        f"{s1['grad_norm_torch']:.5f}",
        "",
        f"Draws replayed: {result['draws']}",
        "",
        "| step | lr | loss ours | loss PyTorch | loss rel | max param rel | max EMA rel | update rel |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f = result["final_grads"]
    lines.insert(
        1,
        f"\nAt the step-{len(result['steps'])} weights (ours copied into PyTorch), t = {f['t'][:4]} + drawn: loss rel diff "
        f"{f['loss_rel']:.1e}, gradients max rel diff {f['grad_max_rel']:.1e} ({f['grad_max_rel_param']}; "
        f"{f['params_with_gradient']} tensors with a gradient, {s1['params_with_gradient']} at step 1)",
    )
    if s1["zero_gradient_params"]:
        last = result["steps"][-1]["zero_gradient_param_max_rel"]
        lines[0] += (
            f"; {len(s1['zero_gradient_params'])} key biases with exact gradient 0 left out (their gradient norm "
            f"{s1['zero_gradient_norm_ours']:.1e} / {s1['zero_gradient_norm_torch']:.1e}, rounding noise; after "
            f"{len(result['steps'])} steps their max rel diff is {last:.1e})"
        )
    for r in result["steps"]:
        lines.append(
            f"| {r['step']} | {r['lr_ours']:.2e} | {r['loss_ours']:.6f} | {r['loss_torch']:.6f} | {r['loss_rel']:.1e} "
            f"| {r['param_max_rel']:.1e} | {r['ema_max_rel']:.1e} | {r['update_rel']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--stage", choices=("decoder", "prior", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="workdirs/train_parity", help="folder of train_parity.json / .md")
    parser.add_argument("--torch_threads", type=int, default=1)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    stages = ("decoder", "prior") if args.stage == "both" else (args.stage,)
    results = [run_parity(s, args.steps, args.seed) for s in stages]
    text = "\n\n".join(table(r) for r in results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_parity.json").write_text(json.dumps(results, indent=1))
    (out / "train_parity.md").write_text(text + "\n")
    print(f"wrote {out / 'train_parity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
