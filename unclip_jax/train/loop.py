"""The one train loop for every stage: ``train_and_evaluate(config, workdir)``.

Flow (flax lm1b / big_vision style):

1. mesh + logical rules from ``config.mesh`` (:mod:`unclip_jax.parallel`);
2. the task (``config.task.name``) and its model / diffusion (:mod:`unclip_jax.train.tasks`);
3. the grain pipeline the stage registry names for the task (:data:`unclip_jax.stages.TASKS`,
   :mod:`unclip_jax.input.pipelines`), each process loading its own share of the global batch;
4. abstract-first state: ``jax.eval_shape(init)`` -> logical specs -> ``NamedSharding`` s
   -> either ``jit(init, out_shardings)`` or, when ``WORKDIR/checkpoints`` has one, an
   Orbax restore onto those shardings (automatic resume, any mesh);
5. ``train_step(state, batch) -> (state, metrics)``: pure, ``jit`` with in/out shardings
   and the state donated; the step's RNG is ``fold_in(PRNGKey(config.seed), step)``;
   gradient accumulation scans over ``config.optim.grad_accum_steps`` microbatches;
6. host work only every ``config.log_every`` steps (metrics, NaN check, progress line),
   ``config.checkpoint.every`` steps (async save with the iterator state) and
   ``config.preview_every`` steps (``task.sample`` -> PNG grid / preview metrics);
7. at the end (or on SIGTERM / SIGINT) a final checkpoint; at the end also the params-only export
   of the EMA weights to ``WORKDIR/export/ema``.

Before anything is built the config is validated (:mod:`unclip_jax.train.validate`) and the work directory locked
(:mod:`unclip_jax.train.lock`: one run per directory). A resumed run restores the newest checkpoint that verifies
(:meth:`~unclip_jax.train.checkpoint.Checkpointer.restore_newest_good`), after checking that the config differs from
the checkpointed one only in fields that may change, and drops ``metrics.jsonl`` rows past the restored step.

A non-finite loss raises :class:`~unclip_jax.train.metrics.NonFiniteLossError` naming the
first bad step and the checkpoint a rerun resumes from; states from that step on are never saved. Metrics are
checked before every save, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax import parallel, stages
from unclip_jax.train import checkpoint as ckpt_lib
from unclip_jax.train import lock as lock_lib
from unclip_jax.train import metrics as metrics_lib
from unclip_jax.train import optim, profiling, validate
from unclip_jax.train import state as state_lib
from unclip_jax.train.tasks import Task, make_task

log = logging.getLogger("unclip_jax.train")


# ----------------------------------------------------------------------------- data
def make_train_iterator(config: Any) -> Iterator[dict[str, np.ndarray]]:
    """The task's grain iterator over ``config.data.folder`` (checkpointable ``get_state`` / ``set_state``).

    The pipeline and whether it tokenises captions are the registry row's (``input_stage``, ``tokenizer`` of
    :func:`unclip_jax.stages.task`); ``config.data`` fields with the names of
    :class:`unclip_jax.input.pipelines.PipelineConfig` are passed through, with ``config.seed`` and the global batch
    ``config.batch_size``.
    """
    from unclip_jax.input import pipelines

    row = stages.task(config.task.name)
    folder = config.data.folder
    if not folder:
        raise ValueError("config.data.folder is empty: set it to a finished shard folder (unclip_jax.input.precompute)")
    fields = {f.name for f in dataclasses.fields(pipelines.PipelineConfig)} - {"stage", "global_batch_size", "seed"}
    kw = {k: v for k, v in config.data.items() if k in fields}
    pcfg = pipelines.PipelineConfig(
        stage=row.input_stage, global_batch_size=int(config.batch_size), seed=int(config.seed), **kw
    )
    tokenizer = None
    if row.tokenizer:
        from unclip_jax.input.tokenizer import ClipTokenizer

        tokenizer = ClipTokenizer()
    return iter(pipelines.make_pipeline(pcfg, folder, tokenizer=tokenizer))


def peek(data_iter: Any) -> dict[str, np.ndarray]:
    """The next batch without consuming it (grain iterators: get_state / next / set_state)."""
    saved = data_iter.get_state()
    batch = next(data_iter)
    data_iter.set_state(saved)
    return batch


# ----------------------------------------------------------------------------- state & step
def make_init_fn(task: Task, tx: optax.GradientTransformation) -> Callable[[jax.Array, Any], state_lib.TrainState]:
    """``init(rng, batch) -> TrainState`` with ``nn.Partitioned`` boxes (for abstract-first sharding)."""

    def init(rng: jax.Array, batch: Any) -> state_lib.TrainState:
        variables = task.init(rng, batch)
        variables = dict(variables)
        params = variables.pop("params")
        extra = nn.unbox(variables)
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            extra=extra,
        )

    return init


def init_state(
    task: Task,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    batch: Any,
    mesh: jax.sharding.Mesh,
    rules: Any,
    compiler_options: dict[str, Any] | None = None,
) -> tuple[state_lib.TrainState, Any, Any]:
    """Initialises the state directly into its shards (``compiler_options`` as in :func:`compile_train_step`).

    Returns:
      (state, state shardings, abstract unboxed state).
    """
    init = make_init_fn(task, tx)
    abstract, shardings = parallel.abstract_init(init, rng, batch, mesh=mesh, rules=rules)
    with parallel.mesh_context(mesh, rules):
        init_jit = jax.jit(lambda r, b: nn.unbox(init(r, b)), out_shardings=shardings)
        state = init_jit.lower(rng, batch).compile(compiler_options)(rng, batch)
    return state, shardings, nn.unbox(abstract)


def abstract_state(task: Task, tx: optax.GradientTransformation, batch: Any, mesh, rules) -> tuple[Any, Any]:
    """(abstract unboxed state, shardings) without computing anything (restore target)."""
    abstract, shardings = parallel.abstract_init(
        make_init_fn(task, tx), jax.random.PRNGKey(0), batch, mesh=mesh, rules=rules
    )
    return nn.unbox(abstract), shardings


def _microbatches(batch: Any, k: int) -> Any:
    """[B, ...] -> [k, B/k, ...] with microbatch j = rows j, j+k, ... (keeps each device's rows local)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"config.optim.grad_accum_steps={k} does not divide the batch of {x.shape[0]}")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    base_rng: jax.Array,
    ema_decay: float,
    ema_warmup: bool = False,
    grad_accum_steps: int = 1,
) -> Callable[[state_lib.TrainState, Any], tuple[state_lib.TrainState, dict[str, jax.Array]]]:
    """The pure ``train_step(state, batch) -> (state, metrics)`` (metrics keys ``train/...``)."""

    def train_step(state: state_lib.TrainState, batch: Any) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(params, micro, r):
            return task.loss(params, micro, r, state.extra)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum_steps <= 1:
            (_, aux), grads = grad_fn(state.params, batch, rng)
        else:
            micro = _microbatches(batch, grad_accum_steps)

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, j = xs
                (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, j))
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            m_shape = jax.eval_shape(lambda: loss_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[1])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, aux), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(grad_accum_steps)))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            aux = jax.tree.map(lambda m: m / grad_accum_steps, aux)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = state_lib.ema_decay(state.step, ema_decay, ema_warmup)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=state_lib.ema_update(state.ema_params, params, decay),
            opt_state=opt_state,
        )
        out = {f"train/{k}": jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        out["train/grad_norm"] = optax.tree.norm(grads)
        out["train/param_norm"] = optax.tree.norm(params)
        out["train/lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, out

    return train_step


def compile_train_step(
    train_step: Callable,
    state: Any,
    batch: Any,
    state_shardings: Any,
    mesh: jax.sharding.Mesh,
    rules: Any,
    compiler_options: dict[str, Any] | None = None,
) -> Any:
    """``jit(train_step, in/out shardings, donate state).lower(...).compile()`` under the mesh rules.

    ``compiler_options`` go to XLA (e.g. ``{"xla_backend_optimization_level": 0}`` for quick tests).
    """
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    with parallel.mesh_context(mesh, rules):
        return jitted.lower(state, batch).compile(compiler_options)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Preemption:
    """Records SIGTERM or SIGINT (Ctrl-C); the loop saves a checkpoint after the current step and returns.

    A second SIGINT raises ``KeyboardInterrupt`` at once (the way out when the user does not want to wait).
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop at once)")

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False

    def agreed(self) -> bool:
        """Whether any process was asked to stop (collective across processes)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class TrainResult:
    """What :func:`train_and_evaluate` returns."""

    state: Any
    step: int
    preempted: bool = False
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    export_dir: str | None = None
    signum: int | None = None  # the signal that stopped a preempted run (SIGTERM when not known)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    task: Task | None = None,
    data_iter: Any = None,
    allow_changes: tuple[str, ...] = (),
) -> TrainResult:
    """Trains ``config.task`` for ``config.total_steps`` steps in ``workdir`` (resuming if it has checkpoints).

    Args:
      config: an experiment config (``experiments/<stage>.py:get_config``).
      workdir: checkpoints (``checkpoints/``), metrics (``metrics.jsonl``, ``tb/``), previews
        (``previews/step_<n>.png``) and the export (``export/ema``) go here.
      task: overrides :func:`make_task` (tests).
      data_iter: overrides :func:`make_train_iterator` (must yield per-process batches).
      allow_changes: fields that may differ from the checkpointed config on resume beyond
        :data:`unclip_jax.train.validate.RESUMABLE` (``--allow_config_change``).

    Returns:
      :class:`TrainResult` (final state still on device).

    Raises:
      NonFiniteLossError: the loss became NaN/inf (the message names the step and the checkpoint to resume from).
      ConfigError: a field out of its domain, or a resume with a config that differs in a field that may not.
      WorkdirLocked: another run holds the work directory.
      CheckpointError: no checkpoint of the work directory can be restored.
    """
    validate.validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with lock_lib.WorkdirLock(workdir, primary=jax.process_index() == 0):
        return _train(config, workdir, task, data_iter, tuple(allow_changes))


def _train(config: Any, workdir: str, task: Task | None, data_iter: Any, allow_changes: tuple[str, ...]) -> TrainResult:
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config.mesh)
    task = task or make_task(config)
    total = int(config.total_steps)
    tx, schedule = optim.make_optimizer(config.optim, total)
    parallel.batch_size_per_process(int(config.batch_size), mesh)  # validates divisibility
    data_iter = data_iter if data_iter is not None else make_train_iterator(config)
    primary = jax.process_index() == 0
    cache_dir = profiling.resolve_cache_dir(str(config.compilation_cache_dir))
    if cache_dir:
        log.info("XLA compilation cache: %s", profiling.enable_compilation_cache(cache_dir))
    ck = config.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        every=int(ck.every),
        keep=int(ck.keep),
        async_save=bool(ck.async_save),
    )
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, base_rng = jax.random.split(rng)
    first = parallel.global_batch(peek(data_iter), mesh)
    writer = metrics_lib.create_writer(workdir, primary)
    run_config = config.to_dict()

    if checkpointer.all_steps():
        _check_resume_config(checkpointer, run_config, allow_changes)
        abstract, shardings = abstract_state(task, tx, first, mesh, rules)
        target = ckpt_lib.abstract_with_shardings(abstract, shardings)
        start, state = checkpointer.restore_newest_good(target, data_iter)
        log.info("resumed from %s at step %d", checkpointer.step_dir(start), start)
        if primary:
            metrics_lib.drop_rows_after(os.path.join(workdir, "metrics.jsonl"), start)
            metrics_lib.drop_events_after(os.path.join(workdir, "tb"), start)
    else:
        log.info("initialising the state (compiling the init function) ...")
        state, shardings, _ = init_state(task, tx, init_rng, first, mesh, rules)
        start = 0
        if config.init_from:
            state = ckpt_lib.init_from_native(state, shardings, config.init_from)
            log.info("initialised params, EMA and %s from %s", sorted(state.extra), config.init_from)
        if primary:
            writer.write_hparams({k: v for k, v in _flat(run_config).items()})

    train_step = make_train_step(
        task,
        tx,
        schedule,
        base_rng=base_rng,
        ema_decay=float(config.ema.decay),
        ema_warmup=bool(config.ema.warmup),
        grad_accum_steps=int(config.optim.grad_accum_steps),
    )
    log.info("compiling the train step (the first minute or so of a run; nothing is wrong) ...")
    t0 = time.perf_counter()
    compiled = compile_train_step(train_step, state, first, shardings, mesh, rules)
    flops = metrics_lib.step_flops(compiled, mesh.size)
    log.info("compiled the train step in %.1fs (%s FLOPs/step)", time.perf_counter() - t0, flops)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log.info("%s: %d parameters, mesh %s, rules %s", task.name, n_params, dict(mesh.shape), config.mesh.rules)

    preview_every = int(config.preview_every)
    preview_fn = None
    if preview_every > 0:
        n = int(config.preview_count)
        preview_batch = jax.jit(lambda b: jax.tree.map(lambda x: x[:n], b), out_shardings=parallel.replicated(mesh))(
            first
        )
        with parallel.mesh_context(mesh, rules):
            preview_fn = jax.jit(lambda p, e, b, r: task.sample(p, b, r, e), out_shardings=parallel.replicated(mesh))

    log_every = int(config.log_every)
    peak = profiling.peak_flops_per_sec(list(mesh.devices.flat))
    progress = metrics_lib.Progress(total, start, int(config.batch_size), flops, peak)
    window = profiling.ProfileWindow(
        int(config.profile.start_step), int(config.profile.num_steps), os.path.join(workdir, "profile"), primary
    )
    pending: list[tuple[int, dict]] = []  # device metrics not yet looked at
    to_log: list[tuple[int, dict]] = []
    last: dict[str, float] = {}
    step = start
    preempted = False
    signum = None

    def flush_window(upto: int) -> dict[str, float]:
        """Writes the mean of the logged-but-unwritten steps as the row of ``upto`` (a window in progress too)."""
        if not to_log:
            return {}
        scalars = {**metrics_lib.mean_metrics(to_log), **progress.update(upto)}
        to_log.clear()
        writer.write_scalars(upto, scalars)
        if primary:
            log.info(progress.line(upto, scalars))
        return scalars

    try:
        with _Preemption() as preemption:
            while step < total:
                batch = parallel.global_batch(next(data_iter), mesh)
                window.before_step(step)
                state, m = compiled(state, batch)
                step += 1
                window.after_step(step, m)
                pending.append((step, m))
                checkpointer.poll()
                save_now = _due(step, int(ck.every)) or step == total
                stop_now = (
                    preemption.requested if jax.process_count() == 1 else _due(step, log_every) and preemption.agreed()
                )
                if save_now or stop_now or _due(step, log_every) or _due(step, preview_every):
                    rows = [(s, jax.device_get(mm)) for s, mm in pending]
                    pending.clear()
                    bad = metrics_lib.first_non_finite(rows)
                    if bad is not None:
                        to_log += [r for r in rows if r[0] < bad[0]]
                        flush_window(bad[0] - 1)
                        good = checkpointer.newest_verified_step()
                        where = None if good is None else f"step {good} ({checkpointer.step_dir(good)})"
                        raise metrics_lib.NonFiniteLossError(*bad, checkpoint=where)
                    to_log += rows
                if _due(step, log_every) or step == total or stop_now:
                    last = flush_window(step) or last
                if preview_fn is not None and _due(step, preview_every):
                    if step - start <= preview_every:
                        log.info("compiling the preview sampler (the first preview) ...")
                    _preview(preview_fn, state, preview_batch, base_rng, step, workdir, writer, primary)
                if save_now or stop_now:
                    checkpointer.save(step, state, data_iter, force=True, config=run_config)
                if stop_now:
                    preempted = True
                    signum = preemption.signum or signal.SIGTERM
                    log.warning("%s: saved a checkpoint at step %d; stopping", signal.Signals(signum).name, step)
                    break
        checkpointer.wait()
        export_dir = None
        if not preempted and config.export.at_end:
            export_dir = os.path.join(workdir, "export", "ema")
            ckpt_lib.clean_stale_staging(export_dir)
            variables = {"params": state.ema_params, **state.extra}
            ckpt_lib.export_params(
                task.module, variables, export_dir, variant=config.model.variant, diffusion=task.diffusion_config
            )
            log.info("exported EMA params to %s", export_dir)
    finally:
        try:  # any other stop (an error, a second Ctrl-C): the steps run since the last row are written too
            rows = [(s, jax.device_get(mm)) for s, mm in pending]
            bad = metrics_lib.first_non_finite(rows)
            to_log += [r for r in rows if bad is None or r[0] < bad[0]]
            if to_log:
                flush_window(to_log[-1][0])
        except Exception as e:  # noqa: BLE001 - never hide the error that stopped the run
            log.warning("could not write the metrics of the last steps: %s", e)
        window.close()
        checkpointer.close()
        writer.flush()
    return TrainResult(state=state, step=step, preempted=preempted, metrics=last, export_dir=export_dir, signum=signum)


def _check_resume_config(checkpointer: ckpt_lib.Checkpointer, run_config: dict, allow: tuple[str, ...]) -> None:
    """Compares the config with the newest checkpoint's recorded one (old checkpoints have none)."""
    for step in reversed(checkpointer.all_steps()):
        try:
            meta = checkpointer.meta(step)
        except ValueError:
            continue  # a damaged record: restore_newest_good reports it
        if meta is None or "config" not in meta:
            return
        changed = validate.resume_changes(meta["config"], run_config, allow, where=str(checkpointer.step_dir(step)))
        if changed:
            log.info("resuming with changed %s", ", ".join(changed))
        return


def _preview(preview_fn, state, batch, base_rng, step, workdir, writer, primary) -> None:
    out = preview_fn(state.ema_params, state.extra, batch, jax.random.fold_in(base_rng, -step % (2**31)))
    out = jax.device_get(out)
    images = out.pop("images", None)
    scalars = {f"preview/{k}": float(np.asarray(v)) for k, v in out.items()}
    if scalars:
        writer.write_scalars(step, scalars)
    if images is not None and primary:
        path = metrics_lib.save_image_grid(images, os.path.join(workdir, "previews", f"step_{step:07d}.png"))
        log.info("preview: %s", path)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def export_from_checkpoint(config: Any, workdir: str, out_dir: str | None = None, step: int | None = None) -> str:
    """Params-only export of the EMA weights of a checkpoint in ``workdir`` (latest by default).

    Restores only the shapes it needs (abstract state from the data's first batch) on the
    current mesh, from the newest checkpoint that verifies (a damaged newer one is reported and skipped), and writes :func:`unclip_jax.convert.native.save_native` to ``out_dir``
    (default ``WORKDIR/export/ema_<step>``).
    """
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.logical_rules(config.mesh)
    task = make_task(config)
    tx, _ = optim.make_optimizer(config.optim, int(config.total_steps))
    if out_dir:  # checked before the restore: a long restore must not end in an unwritable place
        parent = os.path.dirname(os.path.abspath(out_dir))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"--export_dir={out_dir}: cannot create {parent} ({e.strerror or e})") from e
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"--export_dir={out_dir}: {parent} is not writable")
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no checkpoints (is --workdir the work directory of a training run?)")
    checkpointer = ckpt_lib.Checkpointer(folder, every=1)
    try:
        steps = checkpointer.all_steps()
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{folder}: no checkpoint of step {step} (there are {steps})")
        if not steps:
            raise FileNotFoundError(f"{folder}: no checkpoint to export")
        batch = parallel.global_batch(peek(make_train_iterator(config)), mesh)
        abstract, shardings = abstract_state(task, tx, batch, mesh, rules)
        target = ckpt_lib.abstract_with_shardings(abstract, shardings)
        step, state = checkpointer.restore_newest_good(target, None, [step] if step is not None else None)
    finally:
        checkpointer.close()
    out_dir = out_dir or os.path.join(workdir, "export", f"ema_{step}")
    ckpt_lib.clean_stale_staging(out_dir)
    return ckpt_lib.export_params(
        task.module,
        {"params": state.ema_params, **state.extra},
        out_dir,
        variant=config.model.variant,
        diffusion=task.diffusion_config,
    )
