"""python -m unclip_jax.main --config=experiments/clip.py:tiny --workdir=workdirs/clip --config.data.folder=DATA/prepare

A CLIP trained from scratch with the symmetric contrastive loss and a learned temperature
(Radford et al. 2021), for the built-in demo; for real data import a pretrained CLIP with
``unclip convert`` instead. ``data.folder`` is a "prepare" shard folder (the clip
pipeline tokenises the captions).

Variants: test (32x32, seconds on CPU), tiny (the CPU demo's 64x64 CLIP: the ``tiny`` model
narrowed to width 64 / projection 64 by ``model.overrides``),
bench, karlo (ViT-L/14 shape), paper (ViT-H/16 shape). Optimiser after CLIP's paper (AdamW, b2 0.98, eps 1e-6,
weight decay 0.2, cosine schedule).
"""

from unclip_jax.train.defaults import apply_test, base_config, sliced

VARIANTS = ("test", "tiny", "bench", "karlo", "paper")


@sliced("clip")
def get_config(arg: str = "test"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/clip.py:{arg}: expected one of {VARIANTS}")
    c = base_config("clip")
    c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.98, 1e-6, 0.2
    c.optim.schedule = "cosine"
    c.ema.decay = 0.999
    if arg == "test":
        apply_test(c)
        c.data.image_size = 32
    elif arg == "tiny":
        # The demo CLIP (unclip_jax.demo): a narrow two-tower model; the prior / decoder / upsampler ``tiny``
        # variants pair with its width 64 (embeddings and caption states).
        c.model.variant = "tiny"
        c.model.overrides.projection_dim = 64
        c.model.overrides.text = dict(width=64, layers=2, heads=2, mlp_dim=256, context_length=77)
        c.model.overrides.vision = dict(
            image_size=64, patch_size=8, stem="patch", width=64, layers=2, heads=2, mlp_dim=256
        )
        c.data.image_size = 64
        c.batch_size, c.total_steps, c.log_every = 128, 160, 10
        c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 2e-3, 25, 0.05
        c.ema.decay, c.ema.warmup = 0.99, True
        c.checkpoint.every = 100
    elif arg == "bench":
        c.model.variant = "tiny"
        c.data.image_size = 64
        c.batch_size, c.total_steps, c.log_every = 64, 100, 50
        c.optim.lr, c.optim.warmup_steps = 5e-4, 100
        c.checkpoint.every = 500
        c.export.at_end = False
    else:
        c.model.variant = arg
        c.data.image_size = 224 if arg == "karlo" else 256
        c.batch_size, c.total_steps = 32768, 400_000
        c.optim.lr, c.optim.warmup_steps = 5e-4, 2000
        c.model.dtype = "bfloat16"
        c.mesh.rules, c.mesh.data, c.mesh.fsdp = "fsdp", 1, -1
        c.checkpoint.every = 5000
    return c
