"""python -m unclip_jax.main --config=experiments/upsampler_1024.py:paper --workdir=workdirs/upsampler_1024 --config.data.folder=DATA/prepare

The second upsampler (256 -> 1024, BSR degradation, linear schedule): the same as
``experiments/upsampler.py:<arg>_1024``. Variants: test, tiny, bench, karlo, paper.
"""

import importlib.util
import os

from unclip_jax.train.defaults import sliced

VARIANTS = ("test", "tiny", "bench", "karlo", "paper")


@sliced("upsampler_1024")
def get_config(arg: str = "test"):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upsampler.py")
    spec = importlib.util.spec_from_file_location("_unclip_experiments_upsampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"{arg}_1024")
