"""Experiment files: every variant loads, names a real model variant, opens with its command; paper = table 3."""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest

from unclip_jax.models import pca_codec
from unclip_jax.train.defaults import SLICES, TOPOLOGIES
from unclip_jax.train.tasks import make_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("prior", "ar_prior", "decoder", "upsampler", "upsampler_1024", "clip")
VARIANTS = ("test", "tiny", "bench", "karlo", "paper")
# The AR prior has no `bench` variant (its throughput is not benchmarked against a PyTorch reference).
FILE_VARIANTS = {"ar_prior": ("test", "tiny", "karlo", "paper"), "decoder": (*VARIANTS, "test_glide", "tiny_glide")}
MODEL_MODULE = {
    "prior": "prior",
    "ar_prior": "ar_prior",
    "decoder": "decoder",
    "upsampler": "upsampler",
    "clip": "clip",
}


def load(name):
    spec = importlib.util.spec_from_file_location(f"_exp_test_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", FILES)
def test_every_variant_builds_its_task(name, tmp_path):
    module = load(name)
    assert module.__doc__.lstrip().startswith(f"python -m unclip_jax.main --config=experiments/{name}.py:")
    variants = FILE_VARIANTS.get(name, VARIANTS)
    assert tuple(module.VARIANTS) == variants
    for variant in variants:
        config = module.get_config(variant)
        models = importlib.import_module(f"unclip_jax.models.{MODEL_MODULE[config.task.name]}")
        assert config.model.variant in models.VARIANTS, (name, variant, config.model.variant)
        if config.task.name == "ar_prior":
            # The codec is fitted on the data before training; without a codec or data the error names the field.
            with pytest.raises(ValueError, match=r"config\.task\.codec"):
                make_task(config)
            # A file of the variant's shapes stands in for the fitted codec.
            m = models.VARIANTS[config.model.variant]
            shapes = pca_codec.shapes(m["embedding_dim"], m["num_components"], m["num_buckets"], m["num_dot_buckets"])
            config.task.codec = str(tmp_path / f"codec_{variant}.npz")
            pca_codec.save(config.task.codec, {k: np.zeros(s) for k, s in shapes.items()})
        if config.task.name == "prior" and not config.model.overrides.learned_null_text:
            # Karlo's prior uses CLIP("") as the unconditional caption: the data folder provides it.
            with pytest.raises(ValueError, match="config.task.null_caption"):
                make_task(config)
            d, n = models.VARIANTS[config.model.variant]["embedding_dim"], 77
            config.task.null_caption = str(tmp_path / "null.npz")
            np.savez(
                config.task.null_caption,
                text_embeds=np.zeros((1, d)),
                text_hidden_states=np.zeros((1, n, d)),
                text_mask=np.ones((1, n), bool),
            )
        task = make_task(config)  # builds module + diffusion; no parameters are created
        assert task.name == config.task.name
        assert config.batch_size > 0 and config.total_steps > 0
    error_file = "upsampler" if name == "upsampler_1024" else name  # upsampler_1024.py wraps upsampler.py
    with pytest.raises(ValueError, match=f"experiments/{error_file}.py:huge"):
        module.get_config("huge")


@pytest.mark.parametrize(
    "name, lr, b2, eps, wd, batch, steps, schedule, sample_steps",
    [
        ("prior", 1.1e-4, 0.96, 1e-6, 6.0e-2, 4096, 600_000, "cosine", "unclip64"),
        ("decoder", 1.2e-4, 0.999, 1e-8, 0.0, 2048, 800_000, "cosine", "250"),
        ("upsampler", 1.2e-4, 0.999, 1e-8, 0.0, 1024, 1_000_000, "cosine", "ddim27"),
        ("upsampler_1024", 1.0e-4, 0.999, 1e-8, 0.0, 512, 1_000_000, "linear", "ddim15"),
    ],
)
def test_paper_variant_carries_table_3(name, lr, b2, eps, wd, batch, steps, schedule, sample_steps):
    c = load(name).get_config("paper")
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (lr, 0.9, b2, eps, wd)
    assert (c.batch_size, c.total_steps, c.ema.decay) == (batch, steps, 0.9999)
    assert (c.diffusion.steps, c.diffusion.schedule, c.diffusion.sample_steps) == (1000, schedule, sample_steps)
    if name.startswith("upsampler"):
        assert c.data.crop_fraction == 0.25
        assert c.data.degradation == ("bsr" if name.endswith("1024") else "blur")
        assert c.model.variant == ("paper_1024" if name.endswith("1024") else "paper")
    if name == "decoder":
        assert (c.diffusion.var_type, c.diffusion.loss_type) == ("learned_range", "hybrid")


def test_ar_prior_paper_variant_carries_table_3():
    """Appendix C table 3, AR prior column: lr 1.6e-4, betas (0.9, 0.91), eps 1e-10, weight decay 4e-2, EMA 0.999,
    batch 4096, 1M iterations; guidance on for previews; caption dropped 10%."""
    c = load("ar_prior").get_config("paper")
    assert c.task.name == "ar_prior" and c.model.variant == "paper"
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (1.6e-4, 0.9, 0.91, 1e-10, 4.0e-2)
    assert (c.batch_size, c.total_steps, c.ema.decay) == (4096, 1_000_000, 0.999)
    assert c.task.drop_text_prob == 0.1 and c.model.overrides.learned_null_text
    assert c.task.guidance_scale > 0


def test_tiny_variants_pair_with_the_demo_clip():
    """Every ``tiny`` experiment trains on the demo CLIP's embeddings (experiments/clip.py:tiny), so their widths agree:
    a user who ran ``make demo`` can train any prior or decoder variant on ``workdirs/demo/data/embed_train_64``."""
    from unclip_jax.models import ar_prior, decoder, prior

    c = load("clip").get_config("tiny")
    proj, text_width = c.model.overrides.projection_dim, c.model.overrides.text.width

    def model_kwargs(name, models):
        config = load(name).get_config("tiny")
        return {**models.VARIANTS[config.model.variant], **config.model.overrides}

    assert model_kwargs("prior", prior)["embedding_dim"] == proj == text_width
    ar = model_kwargs("ar_prior", ar_prior)
    assert (ar["embedding_dim"], ar["text_hidden_dim"]) == (proj, text_width)
    assert ar["num_components"] <= ar["embedding_dim"]
    assert model_kwargs("decoder", decoder)["clip_embeddings_dim"] == proj == text_width


def test_load_experiment_is_the_config_unclip_train_uses(tmp_path, monkeypatch):
    """``load_experiment(spec, overrides)`` = ``--config=spec --config.<field>=value``: locked, overrides checked."""
    from unclip_jax import main as main_lib
    from unclip_jax.train.config_loading import load_experiment

    monkeypatch.chdir(ROOT)
    argv = ["unclip train", "--config=experiments/prior.py:bench", "--workdir=x", "--config.optim.lr=0.5"]
    fv = main_lib.make_flags(argv)
    fv(argv)
    config = load_experiment("experiments/prior.py:bench", overrides={"optim.lr": 0.5})
    assert config.to_dict() == fv.config.to_dict() and config.is_locked
    monkeypatch.chdir(tmp_path)  # relative specs also resolve against the repository root
    assert load_experiment("experiments/decoder.py:test").to_dict() == load("decoder").get_config("test").to_dict()
    with pytest.raises(KeyError, match="lrr"):
        load_experiment("experiments/prior.py:test", overrides={"optim.lrr": 1.0})
    with pytest.raises(TypeError, match="lr"):
        load_experiment("experiments/prior.py:test", overrides={"optim.lr": "fast"})
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_experiment("experiments/nope.py:test")


@pytest.mark.parametrize("slice_name", sorted(SLICES))
def test_slice_variants_apply_their_settings_and_nothing_else(slice_name):
    """``paper@<slice>`` is ``paper`` with exactly :data:`SLICES`' fields changed (what `make plan` compiles)."""
    from unclip_jax.plan import table

    for stage in table.PLAN_STAGES:
        base = _flat(load(stage).get_config("paper").to_dict())
        sliced = _flat(load(stage).get_config(f"paper@{slice_name}").to_dict())
        changed = {k: v for k, v in sliced.items() if base[k] != v}
        wanted = SLICES[slice_name].get(stage, {})
        assert changed == {k: v for k, v in wanted.items() if base[k] != v}, (stage, changed)
        row = next(r for r in table.ROWS if r.stage == stage and r.topology == TOPOLOGIES[slice_name])
        assert row.experiment == f"experiments/{stage}.py:paper@{slice_name}" and not row.overrides


def test_an_unknown_slice_is_named():
    with pytest.raises(ValueError, match="@v9x-8: unknown TPU slice"):
        load("decoder").get_config("paper@v9x-8")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
