"""What the decoder reads from its conditioning: the layout probe and the embedding's attribute variance.

The accuracy curves (:mod:`unclip_jax.demo.curves`) say *that* a decoder's samples miss an attribute; this module
says *where* it is lost, with three measurements on real validation images:

* **what z_i holds** (:func:`attribute_r2`): the fraction of the CLIP image embeddings' variance that each
  attribute's class means explain (one-object training images). An attribute the decoder is to draw from z_i must
  be there; an attribute carrying a small fraction is a weak signal for a small decoder to learn from.
* **what the prior's z_i holds** (:func:`fit_linear_probe`): a linear probe fitted on those training z_i reads
  each attribute from the validation images' own z_i and from the prior's z_i for their captions (the profile's
  sampler settings). What the probe reads from real z_i but not from the prior's is lost in the prior, before the
  decoder sees it; the prior's guidance is one such loss.
* **the layout probe** (:func:`denoise_from`): each validation image is noised to a level t0 of the training chain
  and denoised back (deterministic DDIM, the conditional model only) by the decoder given either **its own** z_i
  and caption or **another image's** (the batch rolled by one). The classifier scores the result against the
  original image. With another image's conditioning, what survives is what x_t still held (the layout: position,
  size, at low t0 the shape too); the difference to the own-conditioning row is what the decoder takes from z_i
  and the caption *once the layout is given*. An attribute the decoder reads back at every t0 is drawn from the
  conditioning; one that z_i holds but the decoder does not read back at high t0 is lost in the decoder.

This is SDEdit's partial noising (Meng et al. 2022, section 3) used as a probe, in the spirit of the paper's own
look at what each half of the bipartite latent (z_i, x_T) carries (section 3.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from unclip_jax.demo.runner import Context

if TYPE_CHECKING:
    from unclip_jax.diffusion.gaussian import GaussianDiffusion

# Noise levels (of the 1,000-step training chain) the probe starts from: most of the shape still in x_t; the layout
# (position, size) still there but little of the shape; pure noise (where the probe is plain sampling).
PROBE_T = (500, 800, 999)
PROBE_STEPS = "25"  # the DDIM spacing the probe denoises with (space_timesteps spec; the demo samples with 25 too)
PROBE_EMBED_N = 2_000  # training images (the one-object ones are used) for the embedding's attribute variance
ATTRIBUTES = ("colour", "shape", "size", "position")  # scored on the probe's outputs
R2_ATTRIBUTES = ("colour", "shape", "size", "background", "position")  # one-object scene attributes


def attribute_r2(z: np.ndarray, labels: np.ndarray) -> float:
    """R^2 of ``z`` ``[N, D]`` on the class means of ``labels`` ``[N]``: 1 - within-class / total sum of squares.

    0 when every class has the same mean, 1 when ``z`` is constant within each class; summed over the D dimensions
    (a dimension of large variance counts as much as it moves z).
    """
    z = np.asarray(z, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(z):
        raise ValueError(f"attribute_r2: {len(labels)} labels for {len(z)} embeddings")
    total = np.sum((z - z.mean(0)) ** 2)
    within = sum(np.sum((z[labels == c] - z[labels == c].mean(0)) ** 2) for c in np.unique(labels))
    return float(1.0 - within / total) if total > 0 else 0.0


def fit_linear_probe(z: np.ndarray, labels: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Weights ``[D + 1, K]`` of a linear probe from ``z`` ``[N, D]`` to ``labels`` ``[N]`` (K = max label + 1).

    Ridge regression onto one-hot targets (closed form, deterministic) on the *unit-normalised* embeddings with a
    bias column: the probe reads the direction of z, which the prior's guidance changes less than its length (a
    guided z_i is longer than a real one), so one probe fitted on real images' z_i reads the prior's too.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(z):
        raise ValueError(f"fit_linear_probe: {len(labels)} labels for {len(z)} embeddings")
    x = _with_bias(z)
    targets = np.eye(int(labels.max()) + 1)[labels]
    return np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)


def probe_accuracy(weights: np.ndarray, z: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``z`` ``[N, D]`` whose :func:`fit_linear_probe` class is ``labels`` ``[N]``."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(z):
        raise ValueError(f"probe_accuracy: {len(labels)} labels for {len(z)} embeddings")
    return float(np.mean(np.argmax(_with_bias(z) @ weights, axis=1) == labels))


def _with_bias(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return np.concatenate([z, np.ones((len(z), 1))], axis=1)


def one_object_labels(attrs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(mask of the one-object examples, ``{attribute: int labels of those}``) from stored ``attr/*`` arrays."""
    one = np.asarray(attrs["attr/num_objects"]).reshape(-1) == 1
    n = len(one)
    labels = {}
    for name in R2_ATTRIBUTES:
        a = np.asarray(attrs[f"attr/{name}"]).reshape(n, -1)[one, 0]
        labels[name] = a
    return one, labels


def level_index(diffusion: GaussianDiffusion, t0: int) -> int:
    """The index of the (respaced) chain whose original timestep is the closest to ``t0``."""
    tmap = np.asarray(diffusion.timestep_map_array)
    return int(np.argmin(np.abs(tmap - t0)))


def denoise_from(
    diffusion: GaussianDiffusion,
    denoise_fn: Callable[..., Any],
    x_start: Any,
    index: int,
    key: Any,
    cond: Mapping[str, Any] | None = None,
) -> Any:
    """``x_start`` noised to chain index ``index`` (``q_sample``), then denoised to x_0 by deterministic DDIM.

    Args:
      diffusion: the (respaced) chain; ``index`` counts its steps (:func:`level_index` finds one for a timestep).
      denoise_fn: ``denoise_fn(x_t, t_model, **cond)``, the network's raw output.
      x_start: ``[B, H, W, C]`` in [-1, 1].
      key: the PRNG key of the noise.
      cond: the network's conditioning.

    Returns:
      ``[B, H, W, C]``: x_0 after ``index + 1`` DDIM steps (eta 0).
    """
    import jax
    import jax.numpy as jnp

    from unclip_jax.diffusion import sampling

    x0 = jnp.asarray(x_start, jnp.float32)
    x = diffusion.q_sample(x0, jnp.full((x0.shape[0],), index), jax.random.normal(key, x0.shape, x0.dtype))
    zeros = jnp.zeros_like(x)

    def body(i: Any, x: Any) -> Any:
        return sampling.ddim_sample(diffusion, denoise_fn, x, index - i, zeros, cond)["sample"]

    return jax.lax.fori_loop(0, index + 1, body, x)


def stage_probe(ctx: Context) -> dict[str, Any]:
    """The final decoder's layout probe on ``probe_n`` validation images; the final CLIP's attribute variance."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.demo import attributes
    from unclip_jax.demo import stages as demo_stages
    from unclip_jax.diffusion.respace import respace
    from unclip_jax.pipeline import images as images_lib

    p = ctx.profile
    pipe = demo_stages.demo_pipeline(ctx)

    train = demo_stages.read_set(ctx, "train_64", PROBE_EMBED_N)
    one, labels = one_object_labels(train["attrs"])
    ctx.command(f"pipe.encode_images(<{int(one.sum())} one-object train_64 images>); probe.attribute_r2 per attribute")

    def encode(images_u8: np.ndarray) -> np.ndarray:  # CLIP image embeddings, 256 images at a time
        real = images_lib.from_uint8(images_u8)
        return np.concatenate([np.asarray(pipe.encode_images(real[i : i + 256])) for i in range(0, len(real), 256)])

    z = encode(train["images"][one])
    r2 = {name: attribute_r2(z, lab) for name, lab in labels.items()}
    ctx.log("  z_i variance explained: " + ", ".join(f"{k} {v:.3f}" for k, v in r2.items()))

    val = demo_stages.read_set(ctx, "val_64")
    val_one, val_labels = one_object_labels(val["attrs"])
    z_val = encode(val["images"])  # once: the probe reads the one-object ones, the layout probe the first n
    val_captions = [c for c, keep in zip(val["captions"], val_one) if keep]
    ctx.command(
        f"probe.fit_linear_probe(<one-object train z_i>) read on <{len(val_captions)} one-object val_64 images>' "
        "own z_i and on pipe(<their captions>, seed=0, settings=<the profile's>, stop_after='prior')"
    )
    read = {
        "real": z_val[val_one],
        "prior": np.asarray(
            pipe(val_captions, seed=0, settings=demo_stages.sample_settings(ctx), stop_after="prior")["image_embeds"]
        ),
    }
    weights = {name: fit_linear_probe(z, lab) for name, lab in labels.items()}  # one probe per attribute
    z_probe = {
        name: {src: probe_accuracy(w, zs, val_labels[name]) for src, zs in read.items()} for name, w in weights.items()
    }
    ctx.log(
        "  linear probe on z_i, real / prior's: "
        + ", ".join(f"{k} {v['real']:.3f} / {v['prior']:.3f}" for k, v in z_probe.items())
    )
    n = min(p.probe_n, len(val["captions"]))
    captions = val["captions"][:n]
    attrs = {k: v[:n] for k, v in val["attrs"].items()}
    real = images_lib.from_uint8(val["images"][:n])
    text = pipe.encode_texts(captions)
    own = dict(
        image_embeds=jnp.asarray(z_val[:n]),
        text_embeds=jnp.asarray(text["text_embeds"]),
        text_hidden_states=jnp.asarray(text["last_hidden_state"]),
        text_mask=jnp.asarray(text["mask"], bool),
    )
    other = {k: jnp.roll(v, 1, axis=0) for k, v in own.items()}
    decoder = pipe.components["decoder"]  # the final decoder and its training chain, as the cascade loaded them
    diffusion = respace(pipe.diffusions["decoder"], PROBE_STEPS)
    x_start = jnp.asarray(demo_stages.resize_to(real, pipe.decoder_size))
    classifier, cvars = attributes.load_classifier(ctx.path("classifier"))
    ctx.command(
        f"for t0 in {PROBE_T}: probe.denoise_from(<decoder>, <{n} validation images noised to t0>, ddim "
        f"'{PROBE_STEPS}') given their own z_i and caption, and given the next image's; attributes.score(...)"
    )

    @jax.jit
    def run(x0: Any, cond: dict[str, Any], index: Any) -> Any:
        def fn(x_t: Any, t: Any, **c: Any) -> Any:
            return decoder.module.apply(decoder.variables, x_t, t, **c)

        return denoise_from(diffusion, fn, x0, index, jax.random.PRNGKey(0), cond)

    rows = []
    for t0 in PROBE_T:
        index = level_index(diffusion, t0)
        row: dict[str, Any] = {"t0": int(diffusion.timestep_map_array[index])}
        for name, cond in (("own", own), ("other", other)):
            out = np.asarray(run(x_start, cond, index))
            u8 = images_lib.to_uint8(demo_stages.resize_to(out, attributes.IMAGE_SIZE))
            acc = attributes.score(attributes.predict(classifier, cvars, u8), attrs, captions)
            row[name] = {k: acc[k] for k in ATTRIBUTES}  # correct / total / accuracy (NaN: nothing scored)
        rows.append(row)
        ctx.log(
            f"  t0 {row['t0']}: own z_i "
            + ", ".join(f"{k} {row['own'][k]['accuracy']:.3f}" for k in ATTRIBUTES)
            + "; another image's "
            + ", ".join(f"{k} {row['other'][k]['accuracy']:.3f}" for k in ATTRIBUTES)
        )
    return {
        "r2": r2,
        "r2_images": int(one.sum()),
        "z_probe": z_probe,
        "z_probe_images": len(val_captions),
        "rows": rows,
        "n": n,
        "steps": PROBE_STEPS,
    }
