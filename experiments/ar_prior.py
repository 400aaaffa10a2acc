"""python -m unclip_jax.main --config=experiments/ar_prior.py:tiny --workdir=workdirs/ar_prior --config.data.folder=DATA/embed

The autoregressive prior (paper section 2.2, appendix C): a causal transformer over the
quantised PCA codes of the CLIP image embedding, prefixed by the caption, z_t and the
quantised z_i . z_t; cross-entropy loss, caption dropped 10% for classifier-free
guidance. ``data.folder`` is an "embed" shard folder of :mod:`unclip_jax.input.precompute`
(the prior pipeline's fields). The codec is ``task.codec`` (an .npz of
``unclip_jax.models.pca_codec.save``) or, when empty, ``<data.folder>/ar_prior_codec.npz``
if present, else fitted on ``task.codec_fit_examples`` records of the folder when the
task is built; it is stored in the model's ``stats`` collection (checkpoints, export).

Variants (``:arg``): test (seconds on CPU, pairs with clip ``test``), tiny (the CPU demo's
embeddings: pairs with ``experiments/clip.py:tiny``), karlo (paper-sized latent decoder on ViT-L/14 embeddings),
paper (appendix C table 3: lr 1.6e-4, weight decay 4.0e-2, beta2 0.91, eps 1e-10, EMA
0.999, batch 4096, 1M iterations).
"""

from unclip_jax.train.defaults import apply_table3, apply_test, base_config, sliced

VARIANTS = ("test", "tiny", "karlo", "paper")


@sliced("ar_prior")
def get_config(arg: str = "test"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/ar_prior.py:{arg}: expected one of {VARIANTS}")
    c = base_config("ar_prior")  # reads the prior's data pipeline (unclip_jax.stages.TASKS)
    c.task.codec = ""  # fitted codec .npz; '' = <data.folder>/ar_prior_codec.npz or fit on the folder
    c.task.codec_fit_examples = 100_000
    c.task.guidance_scale = 0.0  # previews; <= 0: no classifier-free guidance
    c.task.temperature = 1.0
    c.task.top_k = 0
    c.task.top_p = 1.0
    c.model.overrides.learned_null_text = True
    if arg == "test":
        apply_test(c)
    elif arg == "tiny":
        # On the demo's embeddings (workdirs/demo/data/embed_train_64; README, "The autoregressive prior").
        c.model.variant = "tiny"
        c.batch_size, c.total_steps, c.log_every = 32, 1200, 50
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-3, 50, "cosine"
        c.optim.weight_decay, c.optim.b2 = 4.0e-2, 0.95
        c.ema.decay, c.ema.warmup = 0.999, True
        c.checkpoint.every = 500
        c.preview_every = 1000
        c.task.guidance_scale = 2.0
    else:
        apply_table3(c, "prior")  # shared unstated choices (warm-up, bf16, fsdp, checkpoint cadence)
        # Table 3, AR prior column.
        c.batch_size, c.total_steps = 4096, 1_000_000
        c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 1.6e-4, 0.9, 0.91, 1e-10, 4.0e-2
        c.ema.decay = 0.999
        c.model.variant = arg
        c.model.remat = True
        c.task.guidance_scale = 2.0
    return c
