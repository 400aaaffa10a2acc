"""The autoregressive prior in the cascade (issue 9: "the pipeline can use it in place of the diffusion prior").

A random ``test``-variant `ARPrior` with a PCA codec fitted on random embeddings is saved natively in place of
``prior`` in a native ``test`` cascade; the loader detects it from the folder, the cascade runs its sampler in the
same compiled program (checked token for token against a direct `ar_prior.sample` call with the same key and
settings, candidate selection included), and ``unclip sample`` with it writes valid PNGs.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from PIL import Image

from unclip_jax import cli
from unclip_jax.models import ar_prior
from unclip_jax.models.prior import PriorTransformer
from unclip_jax.pipeline import StageSettings, program, testing
from unclip_jax.pipeline.loading import PipelineLoadError, load_pipeline

PROMPTS = ["a red cube", "a blue ball on grass"]
AR = dict(guidance_scale=2.0, temperature=0.8, top_k=6, top_p=0.9)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Native test cascade (no super_res_last) with the AR prior as ``prior`` and the diffusion prior in
    ``diffusion_prior/`` (for the kind checks)."""
    root = tmp_path_factory.mktemp("ar_cascade")
    pipe = testing.random_pipeline("test", seed=3, super_res_last=False)
    diffusion_prior = pipe.components["prior"]
    pipe.components["prior"] = testing.random_ar_prior("test", seed=1)
    folder = testing.save_native_pipeline(pipe, root / "model")
    from unclip_jax.convert.native import save_native

    save_native(diffusion_prior.module, diffusion_prior.variables, root / "diffusion_prior")
    return folder


@pytest.fixture(scope="module")
def ar_pipe(model_dir):
    return load_pipeline(model_dir, require=("text_encoder", "decoder", "prior"))


def test_loader_detects_the_ar_prior_and_checks_the_kind(model_dir, ar_pipe):
    comp = ar_pipe.components["prior"]
    assert isinstance(comp.module, ar_prior.ARPrior) and ar_pipe.prior_kind == "ar"
    assert set(comp.variables["stats"]) >= {"mean", "components", "edges", "centres", "dot_edges"}  # the codec
    assert float(np.abs(comp.variables["stats"]["components"]).max()) > 0  # fitted, not init zeros
    assert not (model_dir / "prior" / "diffusion.json").exists()  # the AR prior has no diffusion
    # The same folder through an explicit path, and with the kind asserted.
    explicit = load_pipeline(
        None, paths={"prior": model_dir / "prior", "text_encoder": model_dir, "decoder": model_dir}
    )
    assert explicit.prior_kind == "ar"
    assert load_pipeline(model_dir, prior_kind="ar").prior_kind == "ar"
    with pytest.raises(PipelineLoadError, match=r"prior: .*ARPrior.*'diffusion'"):
        load_pipeline(model_dir, prior_kind="diffusion")
    # prior_kind="ar" prefers MODEL/ar_prior; a diffusion prior given for kind "ar" is refused.
    diff = load_pipeline(model_dir, paths={"prior": model_dir.parent / "diffusion_prior"})
    assert isinstance(diff.components["prior"].module, PriorTransformer) and diff.prior_kind == "diffusion"
    with pytest.raises(PipelineLoadError, match=r"PriorTransformer.*'ar'"):
        load_pipeline(model_dir, paths={"prior": model_dir.parent / "diffusion_prior"}, prior_kind="ar")


def test_pipeline_prior_equals_direct_ar_sample(ar_pipe):
    settings = {"prior": StageSettings(**AR)}
    out = ar_pipe(PROMPTS, seed=11, settings=settings, num_candidates=2, stop_after="prior")
    # Direct call: the same text encodings, the captions repeated per candidate, the prior stage's key.
    enc = ar_pipe.encode_texts(PROMPTS)
    rep = lambda a: np.repeat(a, 2, axis=0)
    comp = ar_pipe.components["prior"]
    key = jax.random.split(jax.random.PRNGKey(11), 4)[0]  # the cascade's per-stage keys: prior, decoder, ...
    direct = jax.jit(functools.partial(ar_prior.sample, comp.module, **AR))(
        comp.variables, rep(enc["last_hidden_state"]), rep(enc["mask"]), rep(enc["text_embeds"]), key
    )
    np.testing.assert_array_equal(out["prior_codes"], np.asarray(direct["codes"]).reshape(2, 2, -1))
    np.testing.assert_array_equal(out["prior_dot_tokens"], np.asarray(direct["dot_tokens"]).reshape(2, 2))
    cands = np.asarray(direct["image_embeds"]).reshape(2, 2, -1)
    np.testing.assert_allclose(out["candidates"], cands, atol=1e-5)
    assert np.abs(cands[:, 0] - cands[:, 1]).max() > 1e-3  # two different draws per caption
    # Candidate selection: the largest z_i . z_t (computed here in float64).
    scores = np.einsum("bnd,bd->bn", cands.astype(np.float64), enc["text_embeds"].astype(np.float64))
    best = np.argmax(scores, axis=1)
    np.testing.assert_array_equal(out["candidate_index"], best)
    np.testing.assert_allclose(out["image_embeds"], cands[np.arange(2), best], atol=1e-5)
    # Guidance scale and temperature are traced: other values run the same program and change the draw.
    count = program.trace_count()
    other = ar_pipe(
        PROMPTS,
        seed=11,
        settings={"prior": StageSettings(**dict(AR, guidance_scale=4.0, temperature=1.5))},
        num_candidates=2,
        stop_after="prior",
    )
    assert program.trace_count() == count
    assert (other["prior_codes"] != out["prior_codes"]).any()


def test_ar_prior_settings_validation_and_description():
    with pytest.raises(ValueError, match="top_p"):
        StageSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        StageSettings(temperature=0.0)
    # Reports: the AR-only fields appear only when set (earlier reports' settings stay identical).
    assert "temperature" not in StageSettings(4).describe()
    assert StageSettings(4, top_k=5).describe()["top_k"] == 5


def test_evaluate_uses_the_same_loader_and_settings(model_dir, ar_pipe):
    import argparse

    from unclip_jax.evaluate import commands as eval_commands
    from unclip_jax.evaluate import generation, instruments
    from unclip_jax.pipeline import DEFAULT_SETTINGS
    from unclip_jax.pipeline.flags import load_from_args, stage_settings

    parser = argparse.ArgumentParser()
    eval_commands.add_arguments(parser)
    argv = ["--model", str(model_dir), "--prior", "ar", "--prior-temperature", "0.7", "--prior-top-k", "3"]
    args = parser.parse_args([*argv, "--stop-after", "decoder"])
    pipe = load_from_args(args, ("text_encoder", "decoder", "prior"))
    assert pipe.prior_kind == "ar" and args.path_prior is None and args.prior_kind == "ar"
    settings = stage_settings(args, DEFAULT_SETTINGS)
    assert settings["prior"].temperature == 0.7 and settings["prior"].top_k == 3
    gen = generation.pipeline_generator(ar_pipe, settings, model={}, mesh=instruments.local_mesh())
    assert gen.settings["prior_kind"] == "ar"
    assert gen.settings["stages"]["prior"]["temperature"] == 0.7
    assert "temperature" not in gen.settings["stages"]["decoder"]


def test_cli_sample_with_the_ar_prior(model_dir, tmp_path, capsys):
    out = tmp_path / "ar" / "grid.png"
    argv = ["sample", "--model", str(model_dir), "--prior=ar", "--prompt", "a red cube", "--num", "2"]
    argv += ["--prior-guidance", "2", "--prior-temperature", "0.9", "--prior-top-k", "8", "--prior-top-p", "0.95"]
    argv += ["--decoder-steps", "2", "--stop-after", "decoder", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "(prior: ar)" in printed and "[unclip] prior: 9 steps done" in printed  # k + 1 = 9 tokens
    singles = sorted(out.parent.glob("grid_image_*.png"))
    assert len(singles) == 2 and f"wrote grid {out}" in printed
    for p in [out, *singles]:
        with Image.open(p) as im:
            im.verify()
    with Image.open(singles[0]) as im:
        assert im.size == (16, 16)  # the decoder output
    # A load error reaches the user as one line and exit code 2, not a traceback.
    capsys.readouterr()
    code = cli.main(
        ["sample", "--model", str(model_dir), "--prior-kind", "diffusion", "--prompt", "x", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("unclip sample:") and "ARPrior" in err and len(err.splitlines()) == 1
