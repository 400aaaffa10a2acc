"""The fields every experiment config has, with their defaults (experiments/<stage>.py start from here).

Experiments are ``ml_collections.ConfigDict`` s; the command line overrides any field
(``--config.optim.lr=1e-4``) and an unknown field or a wrong type is an error naming it.
Fields that may be "unset" use typed empty values ('' / 0) instead of None so that
overrides keep their types.

The config an experiment returns is complete (``unclip train`` and
:func:`unclip_jax.train.config_loading.load_experiment` lock it), so the training code indexes it
(``config.optim.lr``) and every default is written once: here, or for the diffusion fields in
:data:`unclip_jax.diffusion.config.DEFAULTS`. The presets :func:`apply_test` and
:func:`apply_bench` are the ``test`` and ``bench`` variants' shared settings, and
:func:`apply_table3` the paper's hyperparameters.
"""

from __future__ import annotations

import ml_collections

from unclip_jax import stages
from unclip_jax.diffusion.config import DEFAULTS as DIFFUSION_DEFAULTS

STAGES = stages.TASK_NAMES


def base_config(stage: str) -> ml_collections.ConfigDict:
    """Defaults for the task ``stage`` (a :data:`unclip_jax.stages.TASKS` name); see each sub-dict's module for
    the meaning of its fields."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {STAGES}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 64  # global, over all processes
    c.log_every = 50
    c.preview_every = 0  # 0 = no previews
    c.preview_count = 4

    # unclip_jax.train.tasks
    c.task = ml_collections.ConfigDict()
    c.task.name = stage
    c.task.drop_text_prob = 0.1  # prior: caption dropped 10% (section 2.2)
    c.task.drop_image_prob = 0.1  # decoder: CLIP embedding -> learned embedding 10% (section 2.1)
    c.task.drop_caption_prob = 0.5  # decoder: caption dropped 50% (section 2.1)
    c.task.stats = ""  # prior: .npz with mean/std; '' = <data.folder>/image_embed_stats.npz if present
    c.task.null_caption = ""  # .npz of CLIP(""): text_embeds/text_hidden_states/text_mask; '' = data folder's

    # unclip_jax.models.<stage>.build(variant, **overrides)
    c.model = ml_collections.ConfigDict()
    c.model.variant = "test"
    c.model.dtype = "float32"  # compute dtype ('bfloat16' for mixed precision)
    c.model.param_dtype = "float32"
    c.model.remat = False
    c.model.overrides = ml_collections.ConfigDict()

    # unclip_jax.diffusion.config.diffusion_from_config (unused by clip and ar_prior)
    c.diffusion = ml_collections.ConfigDict(dict(DIFFUSION_DEFAULTS))
    c.diffusion.snr_gamma = ml_collections.config_dict.placeholder(float)  # None: off; typed for --config overrides
    c.diffusion.sample_steps = "unclip25"  # previews (unclip_jax.diffusion.respace)
    task = stages.task(stage)
    if task.diffusion:  # the default diffusion of the sampling stage it trains for (Karlo's schedulers)
        c.diffusion.update(dict(stages.stage(task.stage).diffusion))

    # unclip_jax.train.optim
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.decay_steps = 0
    c.optim.end_lr_factor = 0.0
    c.optim.grad_clip_norm = 1.0
    c.optim.grad_accum_steps = 1

    c.ema = ml_collections.ConfigDict()
    c.ema.decay = 0.9999
    c.ema.warmup = False

    # unclip_jax.parallel
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "data"
    c.mesh.rules_override = ()

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # '' = single process (or UNCLIP_COORDINATOR)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.auto = False  # TPU pods / SLURM: jax.distributed.initialize() detects everything

    # unclip_jax.input.pipelines.PipelineConfig fields + the shard folder
    c.data = ml_collections.ConfigDict()
    c.data.folder = ""
    c.data.shuffle = True
    c.data.image_size = 64
    c.data.target_size = 256
    c.data.crop_fraction = 0.25
    c.data.low_res_factor = 4
    c.data.degradation = "blur"
    c.data.caption_swaps = ""  # clip: hard-negative word groups (unclip_jax.input.negatives)
    c.data.read_threads = 4
    c.data.read_buffer = 64
    c.data.prefetch_batches = 2
    c.data.worker_count = 0

    # Fine-tuning: a native folder (``unclip convert import ...``, or another run's ``export/ema``) whose variables
    # replace the fresh initialisation (params, EMA and e.g. the prior's stats) when a run starts without checkpoints.
    c.init_from = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True

    # unclip_jax.train.profiling: a jax.profiler trace of steps start_step+1 .. start_step+num_steps into
    # WORKDIR/profile (start_step -1: off), and the persistent XLA compilation cache ('default':
    # $XDG_CACHE_HOME/unclip_jax/xla; '': off; or a directory).
    c.profile = ml_collections.ConfigDict()
    c.profile.start_step = -1
    c.profile.num_steps = 3
    c.compilation_cache_dir = "default"
    return c


def apply_test(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``test`` variant of every experiment: the model's ``test`` variant, 20 steps of 8 examples that compile
    and run in seconds on a CPU (what the tests train), a checkpoint every 10 steps, no read-ahead threads."""
    c.model.variant = "test"
    c.batch_size, c.total_steps, c.log_every = 8, 20, 5
    c.optim.lr, c.optim.schedule = 1e-3, "constant"
    c.ema.decay = 0.99
    c.checkpoint.every = 10
    c.data.read_threads, c.data.prefetch_batches = 1, 0
    c.compilation_cache_dir = ""  # tests compile from scratch: no state shared between runs
    return c


def apply_bench(c: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
    """The ``bench`` variant of the diffusion stages: the model's ``bench`` variant at ``batch_size``, 100 steps of a
    cosine schedule after a 50-step warm-up, no export. ``make bench`` (:mod:`unclip_jax.bench`) times these networks and
    settings at the smaller batch it measures both frameworks at, passed as an override."""
    c.model.variant = "bench"
    c.batch_size, c.total_steps, c.log_every = batch_size, 100, 50
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-4, 50, "cosine"
    c.ema.decay, c.ema.warmup = 0.999, True
    c.checkpoint.every = 500
    c.preview_every = 1000
    c.export.at_end = False
    return c


def apply_table3(c: ml_collections.ConfigDict, column: str) -> ml_collections.ConfigDict:
    """Paper appendix C table 3 hyperparameters of one column (AdamW beta1 = 0.9 throughout).

    Columns: 'prior' (diffusion prior), 'decoder' (64), 'upsampler' (64->256), 'upsampler_1024'.
    Warm-up, schedule, clipping and precision are not stated in the paper; the values here
    are ours (10k warm-up steps, constant, clip 1.0, bfloat16 compute with float32 params).
    """
    table = {
        # steps, schedule, batch, iters, lr, b2, eps, wd, ema, sample steps
        "prior": (1000, "cosine", 4096, 600_000, 1.1e-4, 0.96, 1e-6, 6.0e-2, 0.9999, "unclip64"),
        "decoder": (1000, "cosine", 2048, 800_000, 1.2e-4, 0.999, 1e-8, 0.0, 0.9999, "250"),
        "upsampler": (1000, "cosine", 1024, 1_000_000, 1.2e-4, 0.999, 1e-8, 0.0, 0.9999, "ddim27"),
        "upsampler_1024": (1000, "linear", 512, 1_000_000, 1.0e-4, 0.999, 1e-8, 0.0, 0.9999, "ddim15"),
    }
    steps, sched, batch, iters, lr, b2, eps, wd, ema, sample = table[column]
    c.diffusion.steps, c.diffusion.schedule, c.diffusion.sample_steps = steps, sched, sample
    c.batch_size, c.total_steps = batch, iters
    c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = lr, 0.9, b2, eps, wd
    c.optim.warmup_steps, c.optim.schedule, c.optim.grad_clip_norm = 10_000, "constant", 1.0
    c.ema.decay = ema
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
    c.mesh.rules = "fsdp"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.checkpoint.every = 5000
    c.log_every = 100
    c.preview_every = 10_000
    return c


# TPU slices (Cloud TPU names) -> experiment file -> the ``--config.<field>`` settings with which its ``paper``
# train step fits the slice's HBM with 10% headroom, as `unclip plan` compiled it (PLAN.md, `make plan`). Chosen
# with ``--config=experiments/<stage>.py:paper@<slice>``; the experiments' own mesh (fsdp over all chips, the
# upsamplers' 64-way split) applies where a slice adds nothing.
SLICES: dict[str, dict[str, dict[str, object]]] = {
    "v5p-128": {
        "clip": {"model.remat": True},
        # 16 examples per chip as two microbatches of 8.
        "decoder": {"optim.grad_accum_steps": 2},
    },
    "v5e-256": {
        # 16 GiB chips: fsdp 128 x data 2 (the priors' and CLIP's widths do not divide 256), and microbatches.
        "prior": {"mesh.fsdp": 128, "mesh.data": -1, "optim.grad_accum_steps": 2},
        "ar_prior": {"mesh.fsdp": 128, "mesh.data": -1},
        "clip": {"mesh.fsdp": 128, "mesh.data": -1, "model.remat": True},
        "decoder": {"optim.grad_accum_steps": 8},
    },
}
TOPOLOGIES = {"v5p-128": "v5p:4x4x8", "v5e-256": "v5e:16x16"}  # the slices as `unclip plan --topology` names them


def apply_slice(c: ml_collections.ConfigDict, experiment: str, slice_name: str) -> ml_collections.ConfigDict:
    """:data:`SLICES`' settings of ``experiment`` (``decoder``, ``upsampler_1024``, ...) on ``slice_name``."""
    if slice_name not in SLICES:
        raise ValueError(f"@{slice_name}: unknown TPU slice; expected one of {sorted(SLICES)}")
    for field, value in SLICES[slice_name].get(experiment, {}).items():
        *path, leaf = field.split(".")
        node = c
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def sliced(experiment: str):
    """Decorates an experiment's ``get_config(arg)`` so that ``arg`` may name a slice: ``"paper@v5e-256"`` is
    ``get_config("paper")`` with :func:`apply_slice`. ``upsampler`` variants ending in ``_1024`` take the
    ``upsampler_1024`` settings."""

    def wrap(get_config):
        def get(arg: str = "test"):
            variant, _, slice_name = arg.partition("@")
            c = get_config(variant)
            name = f"{experiment}_1024" if experiment == "upsampler" and variant.endswith("_1024") else experiment
            return apply_slice(c, name, slice_name) if slice_name else c

        get.__doc__ = get_config.__doc__
        return get

    return wrap
