"""python -m unclip_jax.main --config=experiments/decoder_inpaint.py:tiny_inpaint --workdir=workdirs/decoder_inpaint --config.data.folder=DATA/embed

GLIDE's inpainting fine-tune of the 64x64 decoder (GLIDE section 4.3; ``InpaintText2ImUNet``): the decoder with four
extra input channels (the masked image and the mask) trained on images with a random region erased (rectangles or
free-form strokes, ``unclip_jax.train.tasks.decoder_inpaint``), with the decoder's loss, diffusion and classifier-free
guidance dropouts. Start from a trained decoder by widening its input convolution (zero weights on the new channels:
the same function at step 0)::

    from unclip_jax.convert.decoder import widen_for_inpainting
    widen_for_inpainting("workdirs/decoder/export/ema", "workdirs/decoder_wide")
    # then --config.init_from=workdirs/decoder_wide

Variants: the decoder experiment's ``test``, ``tiny`` and ``paper`` (``experiments/decoder.py``) as inpainting
decoders: ``test_inpaint``, ``tiny_inpaint`` (the CPU demo, a quarter of the decoder's steps), ``paper_inpaint``.
"""

import importlib.util
import os

VARIANTS = ("test_inpaint", "tiny_inpaint", "paper_inpaint")


def _decoder_experiment():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decoder.py")
    spec = importlib.util.spec_from_file_location("_experiments_decoder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = "test_inpaint"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/decoder_inpaint.py:{arg}: expected one of {VARIANTS}")
    c = _decoder_experiment().get_config(arg.removesuffix("_inpaint"))
    c.task.name = "decoder_inpaint"
    if arg == "tiny_inpaint":
        c.total_steps = c.total_steps // 4  # a fine-tune of the demo decoder (config.init_from)
    return c
