"""python -m unclip_jax.main --config=experiments/prior.py:tiny --workdir=workdirs/prior --config.data.folder=DATA/embed

The diffusion prior (paper section 2.2): x0-prediction on normalised CLIP image
embeddings, caption dropped 10% for classifier-free guidance. ``data.folder`` is an
"embed" shard folder of :mod:`unclip_jax.input.precompute` (its ``image_embed_stats.npz``
normalises the targets).

Variants (``:arg``): test (seconds on CPU, pairs with clip ``test``), tiny (the CPU demo: the
``tiny`` prior, pairs with ``experiments/clip.py:tiny``), bench (throughput), karlo (fine-tune the
Karlo prior: CLIP ViT-L/14, the empty caption as null input), paper (appendix C table 3).
"""

from unclip_jax.train.defaults import apply_bench, apply_table3, apply_test, base_config, sliced

VARIANTS = ("test", "tiny", "bench", "karlo", "paper")


@sliced("prior")
def get_config(arg: str = "test"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/prior.py:{arg}: expected one of {VARIANTS}")
    c = base_config("prior")
    c.model.overrides.learned_null_text = True
    c.optim.weight_decay = 6.0e-2
    c.optim.b2 = 0.96
    c.optim.eps = 1e-6
    if arg == "test":
        apply_test(c)
        c.diffusion.sample_steps = "unclip8"
    elif arg == "tiny":
        c.model.variant = "tiny"
        c.batch_size, c.total_steps, c.log_every = 64, 750, 25
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-3, 50, "cosine"
        c.ema.decay, c.ema.warmup = 0.995, True
        c.diffusion.sample_steps = "unclip25"
        c.checkpoint.every = 250
    elif arg == "bench":
        apply_bench(c, batch_size=64)
    elif arg == "karlo":
        apply_table3(c, "prior")
        c.model.variant = "karlo"
        c.model.overrides.learned_null_text = False  # Karlo: CLIP("") is the unconditional input
    else:
        apply_table3(c, "prior")
        c.model.variant = "paper"
    return c
