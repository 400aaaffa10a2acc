"""python -m unclip_jax.main --config=experiments/upsampler.py:tiny --workdir=workdirs/upsampler --config.data.folder=DATA/prepare

The super-resolution U-Nets (paper section 2.1, appendix C), trained on random crops with
eps MSE. ``arg`` is a variant, optionally with ``_1024`` for the second stage:

- stage 1 (64 -> 256): Gaussian-blur degradation, cosine schedule, DDIM 27 for previews;
- stage 2 (256 -> 1024, ``experiments/upsampler_1024.py`` or ``:<variant>_1024``): BSR
  degradation, linear schedule, DDIM 15.

Variants: test (tiny crops, seconds on CPU), tiny (the CPU demo: 32 -> 128 on 32x32 crops, after the
``tiny`` decoder's 32x32 output), bench, karlo, paper.
"""

from unclip_jax import stages
from unclip_jax.train.defaults import apply_bench, apply_table3, apply_test, base_config, sliced

VARIANTS = ("test", "tiny", "bench", "karlo", "paper")


@sliced("upsampler")
def get_config(arg: str = "test"):
    variant, stage2 = (arg[: -len("_1024")], True) if arg.endswith("_1024") else (arg, False)
    if variant not in VARIANTS:
        raise ValueError(f"experiments/upsampler.py:{arg}: expected one of {VARIANTS} (optionally + '_1024')")
    c = base_config("upsampler")
    if stage2:  # the 256->1024 stage's diffusion (linear schedule, paper table 3)
        c.diffusion.update(dict(stages.stage("upsampler_1024").diffusion))
    c.diffusion.sample_steps = "ddim15" if stage2 else "ddim27"
    c.data.degradation = "bsr" if stage2 else "blur"
    c.data.target_size = 1024 if stage2 else 256
    c.data.crop_fraction = 0.25
    c.data.low_res_factor = 4
    if variant == "test":
        apply_test(c)
        c.data.target_size, c.data.crop_fraction = 32, 0.5  # 16x16 crops of 4x4 low-res
        c.diffusion.sample_steps = "ddim5"
    elif variant == "tiny":
        c.model.variant = "tiny"
        c.diffusion.mean_type = "v"  # minutes of CPU: v-prediction samples cleanly in a few DDIM steps much sooner
        c.data.target_size = 512 if stage2 else 128  # 32x32 crops of 8x8 low-res (x4, as in the paper)
        # 2,000 steps (about 5 CPU minutes): a 500-step upsampler leaves grain in flat backgrounds.
        c.batch_size, c.total_steps, c.log_every = 16, 2000, 50
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 2e-3, 30, "cosine"
        c.ema.decay, c.ema.warmup = 0.995, True
        c.checkpoint.every = 100
    elif variant == "bench":
        apply_bench(c, batch_size=16)
    else:
        apply_table3(c, "upsampler_1024" if stage2 else "upsampler")
        c.model.variant = "paper_1024" if stage2 and variant == "paper" else variant
        # The channel counts (320 x 1,2,3,4; 192 x 1,1,2,2,4,4) divide 64 but not 128: on a wider fsdp axis the
        # conv kernels would stay whole on every chip, so the parameters split 64 ways and data takes the rest
        # (unclip plan: the sharding check).
        c.mesh.fsdp, c.mesh.data = 64, -1
    return c
