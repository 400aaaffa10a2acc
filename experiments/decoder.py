"""python -m unclip_jax.main --config=experiments/decoder.py:tiny --workdir=workdirs/decoder --config.data.folder=DATA/embed

The 64x64 decoder (paper section 2.1): GLIDE-style U-Net conditioned on the CLIP image
embedding (4 extra context tokens + additive time embedding) and the caption; hybrid loss
with learned-range variance (Improved DDPM); CLIP embedding dropped 10% (learned
embedding) and caption dropped 50%, independently, for classifier-free guidance.

Variants: test (16x16, pairs with clip ``test``), tiny (the CPU demo: the ``tiny`` decoder at
32x32, pairs with ``experiments/clip.py:tiny``; the demo's upsampler takes it to 128x128),
bench, karlo (fine-tune Karlo's decoder), paper (appendix C table 3, with GLIDE's caption transformer of
ctx 256 / width 2048 / 24 blocks / 32 heads trained jointly: 3.56B parameters, the paper's 3.5B).

GLIDE variants (:data:`GLIDE_VARIANTS`): ``test_glide`` and ``tiny_glide`` are ``test`` and ``tiny`` with the
decoder's own small caption transformer (``text_encoder="glide"``) in place of the frozen CLIP caption states.
"""

from unclip_jax.train.defaults import apply_bench, apply_table3, apply_test, base_config, sliced

GLIDE_VARIANTS = ("test_glide", "tiny_glide")
VARIANTS = ("test", "tiny", "bench", "karlo", "paper", *GLIDE_VARIANTS)


@sliced("decoder")
def get_config(arg: str = "test"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/decoder.py:{arg}: expected one of {VARIANTS}")
    if arg in GLIDE_VARIANTS:
        c = get_config(arg.removesuffix("_glide"))
        c.model.overrides.text_encoder = "glide"
        return c
    c = base_config("decoder")
    c.diffusion.loss_type = "hybrid"
    if arg == "test":
        apply_test(c)
        c.data.image_size = 16
        c.diffusion.sample_steps = "unclip8"
    elif arg == "tiny":
        # Minutes of CPU: v-prediction (Salimans & Ho 2022) with fixed variance and L_simple, which samples cleanly
        # long before an epsilon / learned-variance model of this size does.
        c.model.variant = "tiny"
        c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type = "v", "fixed_small_log", "mse"
        c.data.image_size = 32
        c.task.drop_caption_prob = 0.2  # the caption is the only carrier of shape (the demo CLIP's z_i has little)
        c.batch_size, c.total_steps, c.log_every = 16, 1600, 50
        c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 40, "cosine"
        c.ema.decay, c.ema.warmup = 0.995, True
        c.diffusion.sample_steps = "unclip25"
        c.checkpoint.every = 100
    elif arg == "bench":
        apply_bench(c, batch_size=32)
        c.data.image_size = 64
    else:
        apply_table3(c, "decoder")
        c.model.variant = arg
        if arg == "paper":
            c.model.overrides.text_encoder = "glide"  # section 2.1: GLIDE's text encoder, trained with the decoder
    return c
