"""UnclipPipeline: candidate selection, guidance identities, one compilation, manipulations, loading, images.

All on a random cascade of the models' ``test`` variants (16x16 decoder, 32x32 super-res); programs are compiled
once per shape and reused across tests (module-scoped pipeline, guidance scales and eta are traced).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from unclip_jax.pipeline import Component, StageSettings, UnclipPipeline, images, manipulations, program, slerp, testing
from unclip_jax.pipeline.loading import PipelineLoadError, load_pipeline

PROMPTS = ["a red cube", "a blue ball on grass"]


@pytest.fixture(scope="module")
def pipe():
    return testing.random_pipeline("test", seed=0)


def _settings(prior_scale, decoder_scale):
    return dict(
        prior=StageSettings(4, "ddpm", guidance_scale=prior_scale),
        decoder=StageSettings(4, "ddpm", guidance_scale=decoder_scale),
    )


@pytest.fixture(scope="module")
def guided_one(pipe):
    """Guided program (doubled batch) at scale 1, 3 prior candidates, up to the decoder."""
    return pipe(PROMPTS, seed=5, settings=_settings(1.0, 1.0), num_candidates=3, stop_after="decoder")


def test_candidate_selection_keeps_the_largest_dot_product(guided_one):
    out = guided_one
    cands, z_t = out["candidates"], out["text_embeds"]
    assert cands.shape == (2, 3, 32)
    scores = np.einsum("bnd,bd->bn", cands.astype(np.float64), z_t.astype(np.float64))
    np.testing.assert_allclose(out["candidate_scores"], scores, rtol=1e-5, atol=1e-5)
    best = np.argmax(scores, axis=1)
    np.testing.assert_array_equal(out["candidate_index"], best)
    np.testing.assert_array_equal(out["image_embeds"], cands[np.arange(2), best])
    assert np.abs(cands[:, 0] - cands[:, 1]).max() > 1e-2  # the candidates are different draws


def test_guidance_scale_one_equals_unguided_and_no_recompile(pipe, guided_one):
    unguided = pipe(PROMPTS, seed=5, settings=_settings(None, None), num_candidates=3, stop_after="decoder")
    for key in ("candidates", "image_embeds", "decoder_images"):
        err = np.abs(guided_one[key] - unguided[key]).max()
        assert err < 1e-5, (key, err)
    # Same shapes and plan with other prompts, seed and guidance scales: no new trace / compilation.
    count = program.trace_count()
    again = pipe(["two dogs", "a house"], seed=9, settings=_settings(4.0, 8.0), num_candidates=3, stop_after="decoder")
    assert program.trace_count() == count
    assert np.abs(again["decoder_images"] - guided_one["decoder_images"]).max() > 1e-2
    # A different plan (here: stop after the prior) is a new program, and the counter sees it.
    pipe(PROMPTS, seed=0, settings=_settings(None, None), num_candidates=3, stop_after="prior")
    assert program.trace_count() == count + 1


def test_prior_alone_needs_no_decoder(pipe, guided_one):
    """Sampling z_i (stop_after="prior") runs without a decoder and draws the same candidates as the full cascade;
    asking such a pipeline for images names the missing component."""
    c = pipe.components
    prior_only = UnclipPipeline(pipe.tokenizer, c["text_encoder"], None, prior=c["prior"], diffusions=pipe.diffusions)
    out = prior_only(PROMPTS, seed=5, settings=_settings(1.0, 1.0), num_candidates=3, stop_after="prior")
    assert "decoder_images" not in out
    np.testing.assert_allclose(out["candidates"], guided_one["candidates"], atol=1e-6)
    np.testing.assert_array_equal(out["image_embeds"], guided_one["image_embeds"])
    with pytest.raises(ValueError, match="component 'decoder' is not loaded"):
        prior_only(PROMPTS, seed=5, settings=_settings(1.0, 1.0), stop_after="decoder")


def test_slerp_endpoints_and_norms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8)).astype(np.float32), 2 * rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-5)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = np.asarray(slerp(a, b, 0.5))
    np.testing.assert_allclose(
        np.linalg.norm(mid, axis=1), 0.5 * (np.linalg.norm(a, axis=1) + np.linalg.norm(b, axis=1)), rtol=1e-5
    )
    # On the great circle: the angle to a equals the angle to b at theta 0.5.
    cos = lambda u, v: np.sum(u * v, 1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(cos(mid, a), cos(mid, b), rtol=1e-5)


@pytest.fixture(scope="module")
def two_images():
    """Two smooth 16x16 test images in [-1, 1]."""
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    a = np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy * 2 - 1], -1)
    b = np.stack([yy * 2 - 1, np.sin(4 * xx * yy), np.cos(3 * xx)], -1)
    return np.stack([a, b]).astype(np.float32) * 0.8


MANIP = dict(decoder=StageSettings("ddim25", "ddim", guidance_scale=None))
OUT_SCALE = 0.002


@pytest.fixture(scope="module")
def manip_pipe(pipe):
    """The test cascade with its decoder's output layer scaled by OUT_SCALE (a smooth, nearly linear denoiser).

    DDIM inversion is only as good as the consistency of eps(x, t) along the trajectory; a random U-Net at full
    scale is far too rough for that (the reconstruction error is O(1)), as an untrained decoder would be.
    """
    dec = pipe.components["decoder"]
    params = jax.tree.map(lambda x: x, dec.variables["params"])
    params["unet"]["conv_out"] = {k: v * OUT_SCALE for k, v in params["unet"]["conv_out"].items()}
    comps = dict(pipe.components, decoder=Component(dec.module, {"params": params}))
    return UnclipPipeline(pipe.tokenizer, **comps)


@pytest.fixture(scope="module")
def latent(manip_pipe, two_images):
    return manipulations.bipartite_latent(manip_pipe, two_images, settings=MANIP)


def test_variation_eta_zero_reconstructs_and_eta_one_varies(manip_pipe, latent):
    pipe = manip_pipe
    one = {k: v[:1] for k, v in latent.items()}
    rec = manipulations.variations(pipe, None, num=3, eta=0.0, latent=one, settings=MANIP, stop_after="decoder")
    err = np.abs(rec["decoder_images"] - latent["x_start"][:1]).max()
    # The same x_T decoded with the other image's embedding: the reconstruction depends on z_i.
    other = dict(one, image_embeds=latent["image_embeds"][1:])
    wrong = manipulations.variations(pipe, None, num=3, eta=0.0, latent=other, settings=MANIP, stop_after="decoder")
    err_wrong = np.abs(wrong["decoder_images"] - latent["x_start"][:1]).max()
    print(f"DDIM inversion + eta=0 decoding: max abs error {err:.2e} (with the other image's z_i: {err_wrong:.2e})")
    assert err < 2e-2
    assert err_wrong > 2 * err
    var = manipulations.variations(pipe, None, num=3, eta=1.0, latent=one, settings=MANIP, stop_after="decoder")
    spread = np.abs(var["decoder_images"][0] - var["decoder_images"][1]).max()
    assert spread > 0.1  # eta > 0 draws different variations


def test_interpolation_endpoints_reproduce_inputs(manip_pipe, two_images, latent, monkeypatch):
    # bipartite_latent is the one computed above (same inputs), so only the decoding program runs here.
    monkeypatch.setattr(manipulations, "bipartite_latent", lambda *a, **k: latent)
    out = manipulations.interpolate(
        manip_pipe, two_images[0], two_images[1], num=3, settings=MANIP, stop_after="decoder"
    )
    x = out["decoder_images"]
    ends = np.abs(x[0] - latent["x_start"][0]).max(), np.abs(x[2] - latent["x_start"][1]).max()
    print(f"interpolation endpoints: max abs error {max(ends):.2e}")
    assert max(ends) < 2e-2
    assert np.abs(x[1] - x[0]).max() > 0.05 and np.abs(x[1] - x[2]).max() > 0.05
    np.testing.assert_allclose(out["image_embeds"][[0, 2]], latent["image_embeds"], atol=1e-5)


def test_interpolation_with_fixed_x_T_shares_one_latent(manip_pipe, two_images, latent, monkeypatch):
    monkeypatch.setattr(manipulations, "bipartite_latent", lambda *a, **k: latent)
    out = manipulations.interpolate(
        manip_pipe, two_images[0], two_images[1], num=3, x_T_mode="fixed", seed=3, settings=MANIP, stop_after="decoder"
    )
    x_T = out["x_T"]
    assert x_T.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(x_T, np.broadcast_to(x_T[:1], x_T.shape))  # one x_T for every theta
    np.testing.assert_allclose(x_T[0], jax.random.normal(jax.random.PRNGKey(3), (16, 16, 3)), atol=1e-6)
    assert np.abs(x_T[0] - latent["x_T"][0]).max() > 0.1  # not an inversion
    np.testing.assert_allclose(out["image_embeds"][[0, 2]], latent["image_embeds"], atol=1e-5)


def test_pca_probe_with_all_components_reconstructs(manip_pipe, two_images, latent, monkeypatch):
    monkeypatch.setattr(manipulations, "bipartite_latent", lambda *a, **k: latent)
    z = latent["image_embeds"]
    rng = np.random.default_rng(1)
    pca = manipulations.fit_pca(np.concatenate([z, z.std() * rng.normal(size=(40, z.shape[1]))]))
    d = z.shape[1]
    out = manipulations.pca_probe(manip_pipe, two_images[0], pca, ks=[0, 2, d], settings=MANIP, stop_after="decoder")
    assert out["labels"] == ["k=0", "k=2", f"k={d}"]
    np.testing.assert_allclose(out["image_embeds"][2], z[0], atol=1e-4)  # all components: z_i itself
    err = [np.abs(x - latent["x_start"][0]).max() for x in out["decoder_images"]]
    print(f"PCA probe: max abs error to the image with k=0, 2, {d} components: {err}")
    assert err[2] < 2e-2  # decoded with the inversion's x_T and eta 0: the image
    assert err[0] > 2 * err[2]  # the mean embedding alone does not reconstruct it


def test_image_embed_source_text_zero_learned(manip_pipe):
    prompts = ["a red cube", "two dogs", "a house"]  # 3 rows: the decode program of the variation test is reused
    out = manip_pipe(
        prompts, seed=7, settings=MANIP, image_embed_source="text", stop_after="decoder", return_intermediates=True
    )
    np.testing.assert_array_equal(out["image_embeds"], out["text_embeds"])  # section 5.1: z_t decoded as z_i
    assert "candidates" not in out  # no prior ran
    dec = manip_pipe.decode(
        out["image_embeds"], captions=prompts, x_T=out["decoder_latents"], seed=7, settings=MANIP, stop_after="decoder"
    )
    np.testing.assert_allclose(dec["decoder_images"], out["decoder_images"], atol=1e-5)
    for source in ("zero", "learned"):
        z = manip_pipe(prompts, seed=7, image_embed_source=source, stop_after="prior")["image_embeds"]
        np.testing.assert_array_equal(z, np.zeros((3, 32), np.float32))


def test_workdir_export_is_found_and_the_newest_step_wins(pipe, tmp_path):
    from unclip_jax.convert.native import save_native
    from unclip_jax.pipeline.loading import load_component, workdir_export

    text = pipe.components["text_encoder"]
    wd = tmp_path / "workdir"
    assert workdir_export(wd) is None
    for step in (5, 12):  # 12 is the newest although "ema_5" sorts after "ema_12" as a string
        save_native(text.module, text.variables, wd / "export" / f"ema_{step}")
    (wd / "export" / "ema_40").mkdir()  # an unfinished export (no config.json) is ignored
    assert workdir_export(wd) == wd / "export" / "ema_12"
    comp, folder = load_component("text_encoder", wd, own_folder=True)
    assert folder == wd / "export" / "ema_12" and type(comp.module) is type(text.module)
    np.testing.assert_array_equal(jax.tree.leaves(comp.variables)[0], np.asarray(jax.tree.leaves(text.variables)[0]))
    save_native(text.module, text.variables, wd / "export" / "ema")  # the end-of-training export wins
    assert workdir_export(wd) == wd / "export" / "ema"
    loaded = load_pipeline(None, paths={"text_encoder": wd}, require=("text_encoder",))  # a workdir as --text-encoder
    assert type(loaded.components["text_encoder"].module) is type(text.module)


def test_text_diff_direction_and_pca():
    class _Fake:
        def encode_texts(self, texts):
            return dict(text_embeds=np.array([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0]]))

    d = manipulations.text_diff_direction(_Fake(), "source", "target")
    np.testing.assert_allclose(d, [0.6, 0.8, 0.0], atol=1e-6)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 6)) @ np.diag([5, 3, 1, 0.5, 0.1, 0.01])
    pca = manipulations.fit_pca(z)
    np.testing.assert_allclose(pca.reconstruct(z[:4], 6), z[:4], atol=1e-5)  # all components: exact
    np.testing.assert_allclose(pca.reconstruct(z[:4], 0), np.broadcast_to(z.mean(0), (4, 6)), atol=1e-6)
    errs = [np.mean((pca.reconstruct(z, k) - z) ** 2) for k in range(7)]
    assert all(e1 >= e2 - 1e-12 for e1, e2 in zip(errs, errs[1:], strict=False))  # more components, less error


def test_missing_component_is_named(tmp_path):
    pipe = testing.random_pipeline("test", seed=2, super_res_last=False)
    pipe.components["prior"] = None
    folder = testing.save_native_pipeline(pipe, tmp_path / "native")
    loaded = load_pipeline(folder, require=("text_encoder", "decoder"))
    assert loaded.components["prior"] is None and loaded.components["super_res_first"] is not None
    with pytest.raises(PipelineLoadError, match="prior"):
        load_pipeline(folder, require=("text_encoder", "decoder", "prior"))
    with pytest.raises(ValueError, match="'prior' is not loaded"):
        loaded(["x"], settings=_settings(None, None), stop_after="decoder")


def test_grid_and_png(tmp_path):
    from PIL import Image

    imgs = np.linspace(-1, 1, 3 * 8 * 8 * 3, dtype=np.float32).reshape(3, 8, 8, 3)
    grid, singles = images.save_outputs(imgs, tmp_path / "g.png", labels=["a", "b", "c"], ncols=3)
    assert len(singles) == 3
    with Image.open(singles[1]) as im:
        np.testing.assert_array_equal(np.asarray(im), images.to_uint8(imgs[1]))
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] == 3 * (8 + 2) + 2
