"""`make bench`: our JAX cascade against diffusers/PyTorch with the same weights, in one run.

Usage::

    python -m unclip_jax.bench --out=BENCHMARKS.md            # everything (~15-30 min on 2 busy cores)
    python -m unclip_jax.bench --quick --only conv,prior       # fewer repeats, some phases

Phases (``--only``): ``conv`` (3x3 conv forward+backward micro-benchmark: ``lax`` autodiff vs our
``custom_vjp`` (`unclip_jax.layers.conv`) vs torch), ``prior`` / ``decoder`` / ``upsampler`` (one train step
of each stage's ``bench`` variant: batch 32 / 8 at 64x64 / 8 on 64x64 crops), ``cascade`` (text to 256x256,
4 prompts, prior 25 / decoder 25 / super-res 7 steps, against diffusers ``UnCLIPPipeline``). The f32
2048x2048 matmul peak of the machine is measured in every run.

Method: every measurement runs in its own subprocess (its peak RSS is ``ru_maxrss`` of that process);
the JAX process builds the model, writes its weights through the weight bridge (`unclip_jax.convert`) and
the PyTorch process loads them with ``from_pretrained``. Times are medians over ``--repeats`` runs after
warm-up; compile time = first call - median steady call. FLOPs: ours from XLA's cost analysis of the
compiled program, torch's from ``torch.utils.flop_counter.FlopCounterMode``. float32, torch with
``torch.set_num_threads(2)``. The JAX train step is the train loop's own ``make_train_step`` (task loss +
AdamW with clipping + EMA); the torch step is the network's forward/backward with the same inputs, an MSE
loss on the predicted noise / x0 and ``torch.optim.AdamW`` (the decoder's variational-bound term is
elementwise and adds no measurable work). Writes ``--out`` (markdown) and the same name with ``.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("conv", "prior", "decoder", "upsampler", "cascade")
STAGE_BATCH = {"prior": 32, "decoder": 8, "upsampler": 8}
CROP = 64  # decoder resolution and upsampler crop size
LOW_RES_FACTOR = 4
CASCADE_PROMPTS = ("a red circle", "a blue square on green", "two yellow triangles", "a purple star")
CONV_SHAPES = "8x64x64x128x128,8x64x64x64x64,8x32x32x128x128"  # B x H x W x Cin x Cout
MATMUL_N = 2048
TORCH_THREADS = 2


# ------------------------------------------------------------------------------------------------ helpers
def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _local_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """XLA f32 n x n matmul GFLOP/s measured inside a job (the load of a shared machine drifts between jobs)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    _block(dot(a, a))
    med, _ = _median_time(lambda: _block(dot(a, a)), repeats)
    return 2.0 * n**3 / med / 1e9


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _torch():
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    return torch


def _torch_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - backend without cost analysis
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _block(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)


# ------------------------------------------------------------------------------------------------ jobs
def job_matmul(workdir: Path, repeats: int) -> dict[str, Any]:
    """f32 2048x2048 matmul: XLA (the peak the GFLOP/s figures are compared with), numpy, torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = int(os.environ.get("UNCLIP_BENCH_MATMUL_N", MATMUL_N))
    flops = 2.0 * n**3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(jnp.dot)
    _block(dot(ja, jb))
    t_xla, _ = _median_time(lambda: _block(dot(ja, jb)), max(repeats, 5))
    a @ b
    t_np, _ = _median_time(lambda: a @ b, max(repeats, 5))
    torch = _torch()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    t_torch, _ = _median_time(lambda: ta @ tb, max(repeats, 5))
    return {
        "size": n,
        "xla_gflops": flops / t_xla / 1e9,
        "numpy_gflops": flops / t_np / 1e9,
        "torch_gflops": flops / t_torch / 1e9,
        "peak_rss_mb": _peak_rss_mb(),
        "job_matmul_gflops": _local_peak_gflops(),
    }


def job_conv(workdir: Path, repeats: int) -> dict[str, Any]:
    """3x3 'same' conv, forward + input grad + weight grad (vjp), lax autodiff vs custom_vjp vs torch."""
    import jax
    import numpy as np

    from unclip_jax.layers.conv import conv2d_same

    torch = _torch()
    rows = []
    shapes = os.environ.get("UNCLIP_BENCH_CONV_SHAPES", CONV_SHAPES)
    for b, h, w, cin, cout in (tuple(int(v) for v in s.split("x")) for s in shapes.split(",")):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, h, w, cin), dtype=np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        g = rng.standard_normal((b, h, w, cout), dtype=np.float32)
        flops = 3 * 2.0 * b * h * w * cin * cout * 9  # forward + two backward convolutions
        row: dict[str, Any] = {"shape": f"B{b} {h}x{w} {cin}->{cout}", "flops": flops}
        fns = {}
        for impl in ("lax", "custom_vjp"):

            def fwd_bwd(x, k, g, impl=impl):
                y, vjp = jax.vjp(lambda x, k: conv2d_same(x, k, impl=impl), x, k)
                return y, vjp(g)

            fns[impl] = jax.jit(fwd_bwd)
            _block(fns[impl](x, k, g))
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
        tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()

        def torch_step(tx=tx, tk=tk, tg=tg):
            tx.grad = tk.grad = None
            y = torch.nn.functional.conv2d(tx, tk, padding=1)
            y.backward(tg)

        torch_step()
        times: dict[str, list[float]] = {"lax": [], "custom_vjp": [], "torch": []}
        for _ in range(repeats):  # interleaved, so that load changes hit all three alike
            for impl, fn in fns.items():
                t0 = time.perf_counter()
                _block(fn(x, k, g))
                times[impl].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_step()
            times["torch"].append(time.perf_counter() - t0)
        for name, ts in times.items():
            med = statistics.median(ts)
            row[name] = {"seconds": med, "gflops": flops / med / 1e9}
        rows.append(row)
    return {"rows": rows, "peak_rss_mb": _peak_rss_mb()}


def _stage_config(stage: str, workdir: Path):
    """experiments/<stage>.py's diffusion settings for the ``bench`` model variant (experiments/ is not importable)."""
    import numpy as np

    from unclip_jax.models import prior as prior_lib
    from unclip_jax.train.defaults import base_config
    from unclip_jax.train.tasks.decoder import zeros_caption

    c = base_config(stage)
    c.model.variant = "bench"
    c.batch_size = STAGE_BATCH[stage]
    if stage == "prior":
        c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.clip_denoised = "x_start", "fixed_small_log", 5.0
        # diffusers' prior has no learned null caption: the dropped caption is an (all-zero) CLIP("") encoding.
        module = prior_lib.build("bench")
        null = workdir / "null_caption.npz"
        np.savez(null, **zeros_caption(module.embedding_dim, module.num_embeddings))
        c.task.null_caption = str(null)
    elif stage == "decoder":
        c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type = "epsilon", "learned_range", "hybrid"
    return c


def _stage_batch(stage: str, module: Any, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    b = STAGE_BATCH[stage]
    if stage == "prior":
        d = module.embedding_dim
        return {
            "image_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_hidden_states": rng.standard_normal((b, module.num_embeddings, d), dtype=np.float32),
            "text_mask": np.ones((b, module.num_embeddings), bool),
        }
    if stage == "decoder":
        d = module.clip_embeddings_dim
        return {
            "image": rng.uniform(-1, 1, (b, CROP, CROP, 3)).astype(np.float32),
            "image_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_embeds": rng.standard_normal((b, d), dtype=np.float32),
            "text_hidden_states": rng.standard_normal((b, 77, module.context_dim), dtype=np.float32),
            "text_mask": np.ones((b, 77), bool),
        }
    low = CROP // LOW_RES_FACTOR
    return {
        "image": rng.uniform(-1, 1, (b, CROP, CROP, 3)).astype(np.float32),
        "low_res": rng.uniform(-1, 1, (b, low, low, 3)).astype(np.float32),
    }


def _save_weights(stage: str, module: Any, variables: dict[str, Any], folder: Path) -> None:
    from unclip_jax.convert import decoder, prior, upsampler

    if stage == "prior":
        prior.save_prior(module, variables, folder)
    elif stage == "decoder":
        decoder.save_unclip_decoder(module, variables, folder)
    else:
        upsampler.save_upsampler(module, variables, folder)


def job_train_jax(stage: str, workdir: Path, repeats: int, conv_impl: str = "lax") -> dict[str, Any]:
    """The train loop's jitted ``train_step`` of the stage's ``bench`` variant; writes the weights for torch.

    ``conv_impl`` is the default of `unclip_jax.layers.conv.Conv` while tracing (the U-Nets' convs): ``lax``,
    the library default (faster than ``custom_vjp`` on jaxlib 0.10.2's YNNPACK convolutions).
    """
    import jax
    import numpy as np

    from unclip_jax.layers.conv import default_impl

    task, batch, state, step = _train_setup(stage, workdir)
    variables = {"params": state.params, **state.extra}
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
    if not (workdir / stage).exists():
        _save_weights(stage, task.module, jax.device_get(variables), workdir / stage)
    t0 = time.perf_counter()
    with default_impl(conv_impl):
        compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = _xla_flops(compiled)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        _block(metrics)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    run()
    med, times = _median_time(run, repeats)
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "compile_s": compile_s,
        "flops": flops,
        "gflops": flops / med / 1e9 if flops else None,
        "params": n_params,
        "step": "unclip_jax.train.loop.make_train_step (task loss + AdamW + clip + EMA)",
        "conv_impl": conv_impl,
        "peak_rss_mb": _peak_rss_mb(),
        "job_matmul_gflops": _local_peak_gflops(),
    }


def _train_setup(stage: str, workdir: Path) -> tuple[Any, Any, Any, Callable]:
    """(task, batch, initial state, the loop's train_step) of a stage's ``bench`` experiment."""
    import flax.linen as nn
    import jax

    from unclip_jax.train import loop, optim
    from unclip_jax.train.tasks import make_task

    config = _stage_config(stage, workdir)
    task = make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = _stage_batch(stage, task.module)
    init = loop.make_init_fn(task, tx)
    state = jax.jit(lambda r, b: nn.unbox(init(r, b)))(jax.random.PRNGKey(0), batch)
    step = loop.make_train_step(task, tx, schedule, base_rng=jax.random.PRNGKey(1), ema_decay=config.ema.decay)
    return task, batch, state, step


def job_train_ab(stage: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """A/B of the U-Nets' convolutions in one process: the same train step traced with ``lax`` and with
    ``custom_vjp`` convs (`unclip_jax.layers.conv.default_impl`), timed interleaved so load drift hits both."""
    import jax

    from unclip_jax.layers.conv import default_impl

    task, batch, state, step = _train_setup(stage, workdir)
    out: dict[str, Any] = {}
    fns = {}
    for impl in ("lax", "custom_vjp"):
        t0 = time.perf_counter()
        with default_impl(impl):  # a fresh function per impl: jit's trace cache does not see the context
            fns[impl] = jax.jit(lambda s, b: step(s, b)).lower(state, batch).compile()
        out[impl] = {"compile_s": time.perf_counter() - t0, "flops": _xla_flops(fns[impl])}
        _block(fns[impl](state, batch))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn(state, batch))
            times[impl].append(time.perf_counter() - t0)
    for impl, ts in times.items():
        out[impl].update(seconds=statistics.median(ts), times=ts)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _torch_stage(stage: str, folder: Path, torch: Any):
    """(trainable modules, ``loss(batch) -> scalar``) of the diffusers model(s) of a stage."""
    import torch.nn.functional as F

    if stage == "prior":
        from diffusers import PriorTransformer

        model = PriorTransformer.from_pretrained(folder)
        models = [model]

        def loss(b, t, noise):
            x_t = b["image_embeds"] + noise  # the network's cost does not depend on the noise level
            out = model(
                x_t,
                timestep=t,
                proj_embedding=b["text_embeds"],
                encoder_hidden_states=b["text_hidden_states"],
                attention_mask=b["text_mask"],
            ).predicted_image_embedding
            return F.mse_loss(out, b["image_embeds"])

    elif stage == "decoder":
        from diffusers import UNet2DConditionModel

        try:
            from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
        except ImportError:  # diffusers < 0.36 kept unCLIP outside ``deprecated``
            from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

        unet = UNet2DConditionModel.from_pretrained(folder / "decoder")
        proj = UnCLIPTextProjModel.from_pretrained(folder / "text_proj")
        models = [unet, proj]

        def loss(b, t, noise):
            hidden, add_t = proj(
                image_embeddings=b["image_embeds"],
                prompt_embeds=b["text_embeds"],
                text_encoder_hidden_states=b["text_hidden_states"],
                do_classifier_free_guidance=False,
            )
            mask = F.pad(b["text_mask"], (proj.clip_extra_context_tokens, 0), value=True)
            out = unet(
                b["image"] + noise, t, encoder_hidden_states=hidden, class_labels=add_t, attention_mask=mask
            ).sample
            return F.mse_loss(out[:, :3], noise)

    else:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(folder)
        models = [unet]

        def loss(b, t, noise):
            low = F.interpolate(b["low_res"], scale_factor=LOW_RES_FACTOR, mode="bicubic", align_corners=False)
            out = unet(torch.cat([b["image"] + noise, low], dim=1), t).sample
            return F.mse_loss(out[:, :3], noise)

    return models, loss


def job_train_torch(stage: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """diffusers forward/backward + AdamW on the same weights and batch shapes as :func:`job_train_jax`."""
    import numpy as np

    torch = _torch()
    from unclip_jax.models import decoder as decoder_lib
    from unclip_jax.models import prior as prior_lib
    from unclip_jax.models import upsampler as upsampler_lib

    module = {"prior": prior_lib, "decoder": decoder_lib, "upsampler": upsampler_lib}[stage].build("bench")
    batch_np = _stage_batch(stage, module)
    batch = {}
    for k, v in batch_np.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        batch[k] = t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t
    models, loss_fn = _torch_stage(stage, workdir / stage, torch)
    params = [p for m in models for p in m.parameters()]
    for m in models:
        m.train()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    b = next(iter(batch.values())).shape[0]
    noise = torch.randn_like(batch["image_embeds"] if stage == "prior" else batch["image"])
    t = torch.randint(0, 1000, (b,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    flops = _torch_flops(step)
    med, times = _median_time(step, repeats)
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "flops": flops,
        "gflops": flops / med / 1e9,
        "params": int(sum(p.numel() for p in params)),
        "peak_rss_mb": _peak_rss_mb(),
        "job_matmul_gflops": _local_peak_gflops(),
    }


def job_cascade_jax(workdir: Path, repeats: int) -> dict[str, Any]:
    """`UnclipPipeline` of the ``bench`` cascade (random weights), written in diffusers' layout for torch."""
    import numpy as np

    from unclip_jax.pipeline.testing import random_pipeline, save_diffusers_pipeline

    pipe = random_pipeline("bench", seed=0, super_res_last=True)
    save_diffusers_pipeline(pipe, workdir / "cascade")
    prompts = list(CASCADE_PROMPTS)
    t0 = time.perf_counter()
    out = pipe(prompts, seed=0, num_candidates=1)
    first = time.perf_counter() - t0
    med, times = _median_time(lambda: pipe(prompts, seed=1, num_candidates=1), repeats)
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "compile_s": max(first - med, 0.0),
        "image_shape": list(np.asarray(out["images"]).shape),
        "peak_rss_mb": _peak_rss_mb(),
        "job_matmul_gflops": _local_peak_gflops(),
    }


def job_cascade_torch(workdir: Path, repeats: int) -> dict[str, Any]:
    """diffusers ``UnCLIPPipeline`` from the folder :func:`job_cascade_jax` wrote (same weights)."""
    torch = _torch()
    from diffusers import UnCLIPPipeline

    try:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    except ImportError:  # diffusers < 0.36
        from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    # model_index.json names text_proj's library "unclip", which from_pretrained will not import: build by hand.
    f = workdir / "cascade"
    pipe = UnCLIPPipeline(
        prior=PriorTransformer.from_pretrained(f / "prior"),
        decoder=UNet2DConditionModel.from_pretrained(f / "decoder"),
        text_proj=UnCLIPTextProjModel.from_pretrained(f / "text_proj"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(f / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(f / "tokenizer"),
        super_res_first=UNet2DModel.from_pretrained(f / "super_res_first"),
        super_res_last=UNet2DModel.from_pretrained(f / "super_res_last"),
        prior_scheduler=UnCLIPScheduler.from_pretrained(f / "prior_scheduler"),
        decoder_scheduler=UnCLIPScheduler.from_pretrained(f / "decoder_scheduler"),
        super_res_scheduler=UnCLIPScheduler.from_pretrained(f / "super_res_scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = list(CASCADE_PROMPTS)

    def run(seed):
        with torch.no_grad():
            return pipe(
                prompts,
                prior_num_inference_steps=25,
                decoder_num_inference_steps=25,
                super_res_num_inference_steps=7,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            ).images

    t0 = time.perf_counter()
    images = run(0)
    first = time.perf_counter() - t0
    flops = _torch_flops(lambda: run(0))
    med, times = _median_time(lambda: run(1), repeats)
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "flops": flops,
        "gflops": flops / med / 1e9,
        "image_shape": list(images.shape),
        "peak_rss_mb": _peak_rss_mb(),
        "job_matmul_gflops": _local_peak_gflops(),
    }


def _run_job(name: str, workdir: Path, repeats: int) -> dict[str, Any]:
    if name == "matmul":
        return job_matmul(workdir, repeats)
    if name == "conv":
        return job_conv(workdir, repeats)
    phase, side = name.split(":")
    if phase == "cascade":
        return (job_cascade_jax if side == "jax" else job_cascade_torch)(workdir, repeats)
    if side == "jax_lax":
        return job_train_jax(phase, workdir, repeats, conv_impl="lax")
    if side == "ab":
        return job_train_ab(phase, workdir, repeats)
    return (job_train_jax if side == "jax" else job_train_torch)(phase, workdir, repeats)


# ------------------------------------------------------------------------------------------------ driver
def _subprocess_job(name: str, workdir: Path, repeats: int, timeout: float) -> dict[str, Any]:
    out = workdir / f"{name.replace(':', '_')}.json"
    cmd = [sys.executable, "-m", "unclip_jax.bench", f"--job={name}", f"--workdir={workdir}", f"--repeats={repeats}"]
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"[bench] {name} FAILED: {' | '.join(tail)}", flush=True)
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    print(f"[bench] {name} done in {wall:.0f} s", flush=True)
    return result


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "-"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()), "torch_threads": 2}


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(ours: dict, ref: dict) -> float | None:
    if "seconds" in ours and "seconds" in ref:
        return ref["seconds"] / ours["seconds"]
    return None


def write_report(report: dict[str, Any], out: Path) -> None:
    """BENCHMARKS.md (tables + machine/versions) and BENCHMARKS.json next to it."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    peak = report.get("matmul", {}).get("xla_gflops")
    lines = [
        "# Benchmarks: unclip_jax vs diffusers/PyTorch (same weights, float32, 2 threads)",
        "",
        f"Written by `python -m unclip_jax.bench` ({'quick' if report['quick'] else 'full'} run, "
        f"{report['repeats']} repeats, medians after warm-up) on {report['date']}. "
        "Speed-up = torch time / our time (> 1: we are faster). Every row was measured in this one run; the "
        "machine is shared, so compare within a run.",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in report['machine']['load_avg_at_start'])}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"Matmul peak ({report.get('matmul', {}).get('size', '-')}x{report.get('matmul', {}).get('size', '-')} f32): XLA {_fmt(peak, '.0f')} GFLOP/s, numpy "
        f"{_fmt(report.get('matmul', {}).get('numpy_gflops'), '.0f')}, torch "
        f"{_fmt(report.get('matmul', {}).get('torch_gflops'), '.0f')}.",
        "",
    ]
    conv = report["results"].get("conv")
    if conv:
        lines += [
            "## 3x3 conv, forward + input grad + weight grad (`unclip_jax.layers.conv`)",
            "",
            "| shape (NHWC) | lax autodiff | custom_vjp | torch | custom_vjp vs lax | custom_vjp vs torch |",
            "|---|---|---|---|---|---|",
        ]
        if "error" in conv:
            lines.append(f"| failed: {conv['error']} | | | | | |")
        for r in conv.get("rows", []):
            cell = {
                k: f"{r[k]['seconds'] * 1e3:.1f} ms ({r[k]['gflops']:.0f} GF/s)" for k in ("lax", "custom_vjp", "torch")
            }
            lines.append(
                f"| {r['shape']} | {cell['lax']} | {cell['custom_vjp']} | {cell['torch']} | "
                f"x{r['lax']['seconds'] / r['custom_vjp']['seconds']:.2f} | "
                f"x{r['torch']['seconds'] / r['custom_vjp']['seconds']:.2f} |"
            )
        lines.append("")
    rows = []
    for phase in ("prior", "decoder", "upsampler", "cascade"):
        res = report["results"].get(phase)
        if not res:
            continue
        ours, ref = res.get("jax", {}), res.get("torch", {})
        what = {
            "prior": f"prior train step, batch {STAGE_BATCH['prior']}",
            "decoder": f"decoder + text_proj train step, batch {STAGE_BATCH['decoder']} at {CROP}x{CROP}",
            "upsampler": f"upsampler train step, batch {STAGE_BATCH['upsampler']} on {CROP}x{CROP} crops",
            "cascade": f"full cascade, {len(CASCADE_PROMPTS)} prompts, 25/25/7 steps to 256x256",
        }[phase]
        err = "; ".join(f"{side}: {r['error']}" for side, r in (("ours", ours), ("torch", ref)) if "error" in r)
        g_ours, g_ref = ours.get("gflops"), ref.get("gflops")
        pk_ours, pk_ref = ours.get("job_matmul_gflops") or peak, ref.get("job_matmul_gflops") or peak
        if phase == "cascade" and g_ours is None and ref.get("flops") and ours.get("seconds"):
            g_ours = ref["flops"] / ours["seconds"] / 1e9  # same work as torch's counted FLOPs
        rows.append(
            f"| {what} | {_fmt(ours.get('seconds'), '.3f')} | {_fmt(ref.get('seconds'), '.3f')} | "
            f"{'x' + _fmt(_ratio(ours, ref)) if _ratio(ours, ref) else '-'} | {_fmt(g_ours, '.0f')} | "
            f"{_fmt(g_ref, '.0f')} | {_fmt(g_ours / pk_ours * 100 if g_ours and pk_ours else None, '.0f')}% / "
            f"{_fmt(g_ref / pk_ref * 100 if g_ref and pk_ref else None, '.0f')}% | {_fmt(ours.get('compile_s'), '.1f')} | "
            f"{_fmt(ours.get('peak_rss_mb'), '.0f')} / {_fmt(ref.get('peak_rss_mb'), '.0f')} | {err} |"
        )
    ab = []
    for phase in ("decoder", "upsampler"):
        res = report["results"].get(phase, {})
        ab_res = res.get("conv_ab", {})
        ours, lax_ = ab_res.get("custom_vjp", {}), ab_res.get("lax", {})
        if "seconds" in ours and "seconds" in lax_:
            ab.append(
                f"| {phase} | {lax_['seconds']:.3f} | {ours['seconds']:.3f} | x{lax_['seconds'] / ours['seconds']:.2f} | "
                f"{_fmt(lax_.get('compile_s'), '.1f')} / {_fmt(ours.get('compile_s'), '.1f')} |"
            )
    if rows:
        lines += [
            "## Training steps and sampling",
            "",
            "| workload (`bench` variants) | ours s | torch s | speed-up | ours GFLOP/s | torch GFLOP/s | "
            "% of matmul peak* (ours / torch) | our compile s | peak RSS MB (ours / torch) | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Ours: the train loop's jitted `train_step` (task loss incl. the decoder's hybrid loss, AdamW, global-norm "
            "clipping, EMA). Torch: the same networks' forward/backward, MSE loss, `torch.optim.AdamW` with clipping. "
            "Our FLOPs come from XLA's cost analysis; for the cascade (whose loops XLA does not cost) the torch "
            "FLOP count is used for both sides. *Peak: the XLA 1024x1024 f32 matmul measured inside the same "
            "job right after it (the machine's load drifts between jobs); the 2048 figure above when absent.",
            "",
        ]
    if ab:
        lines += [
            "## U-Net train step: convolutions through `lax` autodiff vs the custom VJP (`unclip_jax.layers.conv`)",
            "",
            "Both steps compiled in one process and timed interleaved (same load); no buffer donation here.",
            "",
            "| stage | lax convs s | custom_vjp convs s | speed-up | compile s (lax / custom) |",
            "|---|---|---|---|---|",
            *ab,
            "",
        ]
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m unclip_jax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown report; the JSON goes next to it")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (iteration, tests)")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 5, quick 2; cascade 3/1)")
    parser.add_argument("--conv-shapes", default=CONV_SHAPES, help="conv micro-benchmark shapes BxHxWxCinxCout,...")
    parser.add_argument("--matmul-size", type=int, default=MATMUL_N, help="n of the n x n matmul peak")
    parser.add_argument("--job", default="", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement subprocess")
    args = parser.parse_args(argv)

    if args.job:
        workdir = Path(args.workdir)
        result = _run_job(args.job, workdir, args.repeats)
        (workdir / f"{args.job.replace(':', '_')}.json").write_text(json.dumps(result, default=float))
        return 0

    os.environ["UNCLIP_BENCH_CONV_SHAPES"] = args.conv_shapes  # read by the job subprocesses
    os.environ["UNCLIP_BENCH_MATMUL_N"] = str(args.matmul_size)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown phase(s) {unknown}; expected a subset of {list(PHASES)}")
    repeats = args.repeats or (2 if args.quick else 5)
    cascade_repeats = args.repeats or (1 if args.quick else 3)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "repeats": repeats,
        "machine": _machine(),
        "versions": _versions(),
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="unclip_bench_") as tmp:
        workdir = Path(tmp)
        report["matmul"] = _subprocess_job("matmul", workdir, repeats, args.timeout)
        for phase in phases:
            if phase == "conv":
                report["results"]["conv"] = _subprocess_job("conv", workdir, repeats, args.timeout)
                continue
            r = cascade_repeats if phase == "cascade" else repeats
            ours = _subprocess_job(f"{phase}:jax", workdir, r, args.timeout)
            ref = (
                _subprocess_job(f"{phase}:torch", workdir, r, args.timeout)
                if "error" not in ours
                else {"error": "not run: our side failed (it writes the weights)"}
            )
            report["results"][phase] = {"jax": ours, "torch": ref}
            if phase in ("decoder", "upsampler") and "error" not in ours:  # A/B of the U-Nets' convolutions
                report["results"][phase]["conv_ab"] = _subprocess_job(f"{phase}:ab", workdir, r + 1, args.timeout)
    out = Path(args.out)
    write_report(report, out)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
