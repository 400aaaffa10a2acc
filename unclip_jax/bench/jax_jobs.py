"""Our side of the bench: the train loop's jitted ``train_step`` of each ``bench`` experiment and the cascade.

Each job also writes the weights it measured in diffusers' layout, so that the PyTorch job that follows it
(:mod:`unclip_jax.bench.torch_jobs`) runs the same networks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unclip_jax.bench import workloads
from unclip_jax.bench.measure import (
    block,
    interleaved_times,
    job_footer,
    median_time,
    peak_rss_mb,
    timing,
    xla_flops,
)


def train_setup(task: str, workdir: Path) -> tuple[Any, Any, Any, Callable]:
    """(task, batch, initial state, the loop's train_step) of a task's ``bench`` experiment."""
    import flax.linen as nn
    import jax

    from unclip_jax.train import loop, optim
    from unclip_jax.train.tasks import make_task

    config = workloads.train_config(task, workdir)
    trainer = make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    batch = workloads.random_batch(config, trainer.module)
    init = loop.make_init_fn(trainer, tx)
    state = jax.jit(lambda r, b: nn.unbox(init(r, b)))(jax.random.PRNGKey(0), batch)
    step = loop.make_train_step(
        trainer,
        tx,
        schedule,
        base_rng=jax.random.PRNGKey(1),
        ema_decay=float(config.ema.decay),
        ema_warmup=bool(config.ema.warmup),
        grad_accum_steps=int(config.optim.grad_accum_steps),
    )
    return trainer, batch, state, step


def job_train(task: str, workdir: Path, repeats: int, conv_impl: str = "lax") -> dict[str, Any]:
    """The train loop's jitted ``train_step`` of the task's ``bench`` experiment; writes the weights for torch.

    ``conv_impl`` is the default of :class:`unclip_jax.layers.conv.Conv` while tracing (the U-Nets' convs).
    """
    import jax
    import numpy as np

    from unclip_jax.layers.conv import default_impl

    trainer, batch, state, step = train_setup(task, workdir)
    variables = {"params": state.params, **state.extra}
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
    if not (workdir / task).exists():
        workloads.save_weights(task, trainer.module, jax.device_get(variables), workdir / task)
    t0 = time.perf_counter()
    with default_impl(conv_impl):
        compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        block(metrics)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    run()
    med, times = median_time(run, repeats)
    out = timing(med, times, first, xla_flops(compiled))
    out["compile_s"] = compile_s
    return {
        **out,
        "params": n_params,
        "step": "unclip_jax.train.loop.make_train_step (task loss + AdamW + clip + EMA)",
        "conv_impl": conv_impl,
        **job_footer(),
    }


def job_train_ab(task: str, workdir: Path, repeats: int) -> dict[str, Any]:
    """A/B of the U-Nets' convolutions in one process: the same train step traced with ``lax`` and with
    ``custom_vjp`` convs (:func:`unclip_jax.layers.conv.default_impl`), timed interleaved so load drift hits both."""
    import statistics

    import jax

    from unclip_jax.layers.conv import default_impl

    _, batch, state, step = train_setup(task, workdir)
    out: dict[str, Any] = {}
    fns = {}
    for impl in ("lax", "custom_vjp"):
        t0 = time.perf_counter()
        with default_impl(impl):  # a fresh function per impl: jit's trace cache does not see the context
            compiled = jax.jit(lambda s, b: step(s, b)).lower(state, batch).compile()
        out[impl] = {"compile_s": time.perf_counter() - t0, "flops": xla_flops(compiled)}
        block(compiled(state, batch))
        fns[impl] = lambda compiled=compiled: block(compiled(state, batch))
    for impl, ts in interleaved_times(fns, repeats).items():
        out[impl].update(seconds=statistics.median(ts), times=ts)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def job_cascade(workdir: Path, repeats: int) -> dict[str, Any]:
    """:class:`UnclipPipeline` of the ``bench`` cascade (random weights), written in diffusers' layout for torch."""
    import numpy as np

    from unclip_jax.pipeline.testing import random_pipeline, save_diffusers_pipeline

    pipe = random_pipeline(workloads.CASCADE, seed=0, super_res_last=True)
    save_diffusers_pipeline(pipe, workdir / "cascade")
    prompts = list(workloads.CASCADE_PROMPTS)
    t0 = time.perf_counter()
    out = pipe(prompts, seed=0, num_candidates=1)
    first = time.perf_counter() - t0
    med, times = median_time(lambda: pipe(prompts, seed=1, num_candidates=1), repeats)
    return {
        "seconds": med,
        "times": times,
        "first_call_s": first,
        "compile_s": max(first - med, 0.0),
        "image_shape": list(np.asarray(out["images"]).shape),
        **job_footer(),
    }
