"""Accuracy against training compute: the decoder's intermediate checkpoints and CLIP's zero-shot accuracy.

The curves that choose the long profile's step counts (issue: "settings from a measured accuracy-vs-compute
curve"). Each kept checkpoint of a training workdir (``<stage>/checkpoints/<step>``; the profiles that draw curves
keep every one) is exported once to ``<stage>/export/ema_<step>`` (its EMA weights, as ``unclip_jax.main
--mode=export`` writes them) and measured:

* decoder: the demo's validation captions are turned into image embeddings once by the final prior (the same
  z_i for every point), then each checkpoint's decoder draws them with the profile's sampler settings; the
  attribute classifier scores colour and shape of the decoder outputs (section 2.1's decoder alone, without the
  upsampler, so the curve isolates the decoder's training). The same checkpoint also draws the validation
  images' own z_i with their captions (``*_real_z``: no prior in the way), and its denoising error is measured
  directly: the mean squared error of its x_0 prediction on the validation images noised to each of
  :data:`DENOISE_T` (:func:`denoising_mse`; guided-diffusion logs the training loss by timestep quartile for the
  same reason). A falling error at a noise level says training is still buying quality there; blobby samples
  from a decoder whose mid-noise error has stopped falling point at capacity instead of compute;
* CLIP: zero-shot classification (Radford et al. 2021, section 3.1.2) of the one-object validation images among the
  captions ``"a <colour> <shape>"`` of every colour and shape: the fraction whose best caption has the right shape
  (and colour).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unclip_jax.demo.report import figure_png
from unclip_jax.demo.runner import Context

if TYPE_CHECKING:
    from unclip_jax.diffusion.gaussian import GaussianDiffusion

# Noise levels (of the 1,000-step training chain) of the denoising curve: near-clean detail, mid-noise shape, and
# the high-noise layout the conditioning alone decides.
DENOISE_T = (50, 150, 300, 500, 700, 900)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the checkpoints kept in ``workdir/checkpoints`` (orbax step folders), ascending."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def spread(steps: list[int], points: int) -> list[int]:
    """At most ``points`` of ``steps``, evenly spread and always with the last one."""
    if points <= 0 or len(steps) <= points:
        return list(steps)
    idx = np.unique(np.round(np.linspace(len(steps) - 1, 0, points)).astype(int))
    return [steps[i] for i in sorted(idx)]


def export_step(ctx: Context, stage: str, step: int) -> Path:
    """``<stage>/export/ema_<step>``: the EMA weights of one checkpoint (exported unless already there)."""
    from unclip_jax.demo.runner import read_marker
    from unclip_jax.train import loop
    from unclip_jax.train.config_loading import load_experiment

    out = ctx.path(stage, "export", f"ema_{step}")
    if (out / "config.json").is_file():
        return out
    m = read_marker(ctx.workdir, stage)
    if m is None:
        raise RuntimeError(f"curves: stage {stage} has not finished in {ctx.workdir}")
    o = m["outputs"]
    config = load_experiment(o["config"], o["overrides"])
    loop.export_from_checkpoint(config, str(ctx.path(stage)), str(out), step=step)
    return out


def clip_zero_shot(model: Any, variables: Any, images_u8: np.ndarray, attrs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Zero-shot colour / shape accuracy of a CLIP on the one-object images among ``"a <colour> <shape>"``."""
    import jax

    from unclip_jax.input import synthetic
    from unclip_jax.input.tokenizer import ClipTokenizer
    from unclip_jax.models.clip import preprocess_images

    one = np.asarray(attrs["attr/num_objects"]).reshape(-1) == 1
    shape = np.asarray(attrs["attr/shape"]).reshape(len(one), 2)[one, 0]
    colour = np.asarray(attrs["attr/colour"]).reshape(len(one), 2)[one, 0]
    pairs = [(c, s) for c in range(len(synthetic.COLOUR_NAMES)) for s in range(len(synthetic.SHAPES))]
    ids, _ = ClipTokenizer()([f"a {synthetic.COLOUR_NAMES[c]} {synthetic.SHAPES[s]}" for c, s in pairs])
    size = dict(model.vision)["image_size"]
    img = jax.jit(lambda v, x: model.apply(v, preprocess_images(x, size), method="encode_image")["image_embeds"])(
        variables, images_u8[one].astype(np.float32) / 255.0
    )
    txt = model.apply(variables, np.asarray(ids, np.int32), method="encode_text")["text_embeds"]
    img = np.asarray(img) / np.linalg.norm(np.asarray(img), axis=-1, keepdims=True)
    txt = np.asarray(txt) / np.linalg.norm(np.asarray(txt), axis=-1, keepdims=True)
    best = np.asarray(pairs)[(img @ txt.T).argmax(-1)]
    return {
        "shape": float(np.mean(best[:, 1] == shape)),
        "colour": float(np.mean(best[:, 0] == colour)),
        "images": int(one.sum()),
    }


def denoising_mse(
    denoise_fn: Callable[[Any, Any], Any],
    diffusion: GaussianDiffusion,
    x_start: np.ndarray,
    key: Any,
    timesteps: tuple[int, ...] = DENOISE_T,
) -> dict[str, float]:
    """``{str(t): mean squared error of the x_0 prediction}`` for ``x_start`` ``[B, H, W, C]`` in [-1, 1] noised to
    each ``t`` of ``timesteps`` with the same Gaussian noise (drawn from ``key``).

    ``denoise_fn(x_t, t)`` is the network's raw output (its mean part is read with the diffusion's parameterisation,
    epsilon / v / x_start, as the samplers read it); predictions are clipped to [-1, 1] as the samplers clip them.
    """
    import jax
    import jax.numpy as jnp

    x0 = jnp.asarray(x_start, jnp.float32)
    noise = jax.random.normal(key, x0.shape, jnp.float32)
    out = {}
    for t in timesteps:
        tt = jnp.full((x0.shape[0],), t, jnp.int32)
        x_t = diffusion.q_sample(x0, tt, noise)
        mean_part, _ = diffusion.split_model_output(denoise_fn(x_t, tt), x_t)
        pred, _ = diffusion.output_to_xstart_eps(mean_part, x_t, tt)
        out[str(t)] = float(jnp.mean((jnp.clip(pred, -1.0, 1.0) - x0) ** 2))
    return out


def stage_curves(ctx: Context) -> dict[str, Any]:
    """Decoder attribute accuracy and CLIP zero-shot accuracy at each kept checkpoint (``curve_points`` of them)."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.convert.native import load_native
    from unclip_jax.demo import attributes
    from unclip_jax.demo import stages as demo_stages
    from unclip_jax.diffusion.config import diffusion_from_config
    from unclip_jax.pipeline import images as images_lib
    from unclip_jax.pipeline.cascade import Component

    p = ctx.profile
    val = demo_stages.read_set(ctx, "val_64")
    n = min(p.curve_n, len(val["captions"]))
    captions = val["captions"][:n]
    attrs = {k: v[:n] for k, v in val["attrs"].items()}
    pipe = demo_stages.demo_pipeline(ctx)
    settings = demo_stages.sample_settings(ctx)
    model, variables = attributes.load_classifier(ctx.path("classifier"))

    ctx.command(f"pipe({n} validation captions, stop_after='prior')  # the z_i every decoder point decodes")
    z = pipe(captions, seed=1, settings=settings, stop_after="prior")["image_embeds"]
    real = images_lib.from_uint8(val["images"][:n])
    z_real = pipe.encode_images(real)
    text = pipe.encode_texts(captions)
    x_start = demo_stages.resize_to(real, pipe.decoder_size)
    cond = dict(  # the decoder's conditioning for the denoising error: each validation image's own z_i and caption
        image_embeds=jnp.asarray(z_real),
        text_embeds=jnp.asarray(text["text_embeds"]),
        text_hidden_states=jnp.asarray(text["last_hidden_state"]),
        text_mask=jnp.asarray(text["mask"], bool),
    )
    dec_steps = spread(checkpoint_steps(ctx.path("decoder")), p.curve_points)
    ctx.command(
        f"for step in {dec_steps}: python -m unclip_jax.main --mode=export ... decoder/export/ema_<step>; "
        "pipe.decode(z_i, captions, stop_after='decoder') with that decoder, for the prior's z_i and the validation "
        f"images' own; attributes.score(...); curves.denoising_mse(<that decoder>, <validation images>, t in {DENOISE_T})"
    )

    def score(images: np.ndarray) -> dict[str, float]:
        u8 = images_lib.to_uint8(demo_stages.resize_to(images, attributes.IMAGE_SIZE))
        acc = attributes.score(attributes.predict(model, variables, u8), attrs, captions)
        return {k: acc[k]["accuracy"] for k in ("colour", "shape")}

    decoder_rows = []
    for step in dec_steps:
        folder = export_step(ctx, "decoder", step)
        module, v = load_native(folder)
        v = dict(v)
        pipe.components["decoder"] = Component(module, v)
        kw = dict(seed=1, settings=settings, stop_after="decoder")
        acc = score(pipe.decode(z, captions=captions, **kw)["decoder_images"])
        acc_real = score(pipe.decode(z_real, captions=captions, **kw)["decoder_images"])
        with open(folder / "diffusion.json") as f:
            diffusion = diffusion_from_config(json.load(f), where=f"{folder}/diffusion.json")
        apply = jax.jit(lambda x_t, t, module=module, v=v: module.apply(v, x_t, t, **cond))
        mse = denoising_mse(apply, diffusion, x_start, jax.random.PRNGKey(0))
        decoder_rows.append(
            {"step": step, **acc, **{f"{k}_real_z": a for k, a in acc_real.items()}, "denoising_mse": mse}
        )
        ctx.log(
            f"  decoder step {step}: colour {acc['colour']:.3f}, shape {acc['shape']:.3f}; given the real z_i colour "
            f"{acc_real['colour']:.3f}, shape {acc_real['shape']:.3f}; x0 MSE "
            + " / ".join(f"{mse[str(t)]:.4f}" for t in DENOISE_T)
            + f" at t = {' / '.join(map(str, DENOISE_T))}"
        )

    clip_steps = spread(checkpoint_steps(ctx.path("clip")), p.curve_points)
    ctx.command(f"for step in {clip_steps}: CLIP zero-shot 'a <colour> <shape>' on the one-object validation images")
    clip_rows = []
    for step in clip_steps:
        cm, cv = load_native(export_step(ctx, "clip", step))
        zs = clip_zero_shot(cm, cv, val["images"], val["attrs"])
        clip_rows.append({"step": step, "shape": zs["shape"], "colour": zs["colour"]})
        ctx.log(f"  CLIP step {step}: zero-shot shape {zs['shape']:.3f}, colour {zs['colour']:.3f}")

    out_dir = ctx.path("samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curves.png").write_bytes(plot(decoder_rows, clip_rows))
    (out_dir / "curves.json").write_text(json.dumps({"decoder": decoder_rows, "clip": clip_rows}, indent=1))
    return {
        "files": ["samples/curves.png", "samples/curves.json"],
        "decoder": decoder_rows,
        "clip": clip_rows,
        "n": n,
    }


def plot(decoder_rows: list[dict[str, Any]], clip_rows: list[dict[str, float]]) -> bytes:
    """PNG bytes: decoder colour / shape accuracy against its steps (prior z_i solid, real z_i dashed where
    measured), its x_0 MSE per noise level against its steps, CLIP zero-shot accuracy against its steps."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(12.6, 3.0), dpi=100)
    for ax, rows, title in (
        (axs[0], decoder_rows, "decoder outputs (classifier accuracy)"),
        (axs[2], clip_rows, "CLIP zero-shot on one-object images"),
    ):
        for key, colour in (("colour", "C0"), ("shape", "C1")):
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", color=colour, label=key)
            if any(f"{key}_real_z" in r for r in rows):
                pts = [(r["step"], r[f"{key}_real_z"]) for r in rows if f"{key}_real_z" in r]
                ax.plot(*zip(*pts, strict=True), ls="--", marker=".", color=colour, label=f"{key}, real z_i")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axs[1]
    mse_rows = [r for r in decoder_rows if "denoising_mse" in r]
    for t in sorted({int(t) for r in mse_rows for t in r["denoising_mse"]}):
        ax.plot(
            [r["step"] for r in mse_rows], [r["denoising_mse"][str(t)] for r in mse_rows], marker=".", label=f"t={t}"
        )
    if mse_rows:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("training step")
    ax.set_title("decoder x0 MSE on validation images, per noise level", fontsize=9)
    ax.grid(alpha=0.3)
    return figure_png(fig)
