"""The paper's figures 8 and 11 at toy scale: does decoder guidance cost diversity with and without the CLIP image
embedding?

Ramesh et al. 2022 (section 5.2, figures 8 and 11): as the decoder's classifier-free guidance scale rises, unCLIP
(prior image embedding + caption) keeps the diversity of its samples for one prompt, while a caption-only decoder
(GLIDE-like) collapses to a few modes, because the image embedding fixes the semantics the caption leaves open and
guidance only sharpens them. Here both come from the same demo decoder: "unclip" samples z_i with the prior and
guides the decoder on (caption, z_i) against (empty caption, null embedding); "caption-only" replaces z_i by the
decoder's null embedding (the learned classifier-free embedding it was trained to see when z_i is dropped,
``image_embed_source="learned"``; with ``"zero"`` the zero vector), so the guided direction is caption vs empty
caption at that same embedding.

Diversity of the N samples of a prompt, at the decoder's output:

* :func:`mean_pairwise_distance`: mean cosine distance ``1 - cos`` over all pairs of their CLIP image embeddings
  (the demo CLIP);
* :func:`entropy_bits`: Shannon entropy (bits) of the attribute classifier's reading of each attribute the prompt
  leaves free (:data:`FREE_HEADS`: position, size, background of a one-object prompt without those words); its
  largest values are ``log2`` of the head's class count.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from unclip_jax.demo.report import figure_png
from unclip_jax.demo.runner import Context

MODES = ("unclip", "caption-only")
FREE_HEADS = ("position", "size_a", "background")  # what the one-object prompts below leave free
PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a green cross")
SCALES = (1.0, 2.0, 4.0, 8.0)


def mean_pairwise_distance(embeds: np.ndarray) -> float:
    """Mean cosine distance ``1 - cos(e_i, e_j)`` over the pairs ``i < j`` of ``[N, D]`` embeddings (N >= 2)."""
    e = np.asarray(embeds, np.float64)
    if len(e) < 2:
        raise ValueError(f"mean_pairwise_distance: need at least two embeddings, got {len(e)}")
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    cos = e @ e.T
    i, j = np.triu_indices(len(e), k=1)
    return float(np.mean(1.0 - cos[i, j]))


def entropy_bits(labels: np.ndarray, num_classes: int) -> float:
    """Shannon entropy (bits) of the empirical distribution of integer ``labels`` over ``num_classes`` classes."""
    counts = np.bincount(np.asarray(labels, np.int64).reshape(-1), minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def caption_only_source(zero: bool = False) -> str:
    """``image_embed_source`` of the caption-only decoder: the learned null embedding (what the decoder sees when
    training drops z_i) or, with ``zero``, a zero z_i."""
    return "zero" if zero else "learned"


def sample(
    pipe: Any, prompt: str, mode: str, scale: float, n: int, settings: dict[str, Any], seed: int = 0, zero: bool = False
) -> dict[str, np.ndarray]:
    """N decoder-output samples of one prompt in ``mode`` (:data:`MODES`) at decoder guidance ``scale``."""
    if mode not in MODES:
        raise ValueError(f"diversity.sample: mode {mode!r}, expected one of {MODES}")
    s = dict(settings, decoder=dataclasses.replace(settings["decoder"], guidance_scale=float(scale)))
    source = "prior" if mode == "unclip" else caption_only_source(zero)
    return pipe(prompt, seed=seed, num_images_per_prompt=n, settings=s, image_embed_source=source, stop_after="decoder")


def measure(
    images_u8: np.ndarray, clip_embeds: np.ndarray, heads: dict[str, np.ndarray], num_classes: dict[str, int]
) -> dict[str, Any]:
    """Diversity of one prompt's samples: CLIP pairwise distance and the entropy of each free head."""
    ent = {h: entropy_bits(heads[h], num_classes[h]) for h in FREE_HEADS}
    return {
        "clip_distance": mean_pairwise_distance(clip_embeds),
        "entropy": ent,
        "mean_entropy": float(np.mean(list(ent.values()))),
        "images": int(len(images_u8)),
    }


def fidelity(prompt: str, heads: dict[str, np.ndarray]) -> dict[str, float]:
    """Fraction of samples of a one-object prompt ``"a <colour> <shape>"`` whose classifier reading has its colour /
    shape (the other side of the diversity trade-off)."""
    from unclip_jax.input import synthetic

    words = prompt.split()
    colour, shape = synthetic.COLOUR_NAMES.index(words[-2]), synthetic.SHAPES.index(words[-1])
    return {
        "colour_accuracy": float(np.mean(np.asarray(heads["colour_a"]) == colour)),
        "shape_accuracy": float(np.mean(np.asarray(heads["shape_a"]) == shape)),
    }


def plot(table: dict[str, dict[str, dict[str, float]]], scales: Sequence[float]) -> bytes:
    """PNG bytes: mean CLIP distance and mean free-attribute entropy against decoder guidance, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 2, figsize=(8.4, 3.0), dpi=100)
    for ax, key, label in (
        (axs[0], "clip_distance", "mean pairwise CLIP distance (1 - cos)"),
        (axs[1], "mean_entropy", "entropy of free attributes (bits)"),
    ):
        for mode in MODES:
            ys = [table[mode][str(float(s))][key] for s in scales]
            ax.plot(list(scales), ys, marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(scales), [f"{s:g}" for s in scales])
        ax.set_xlabel("decoder guidance scale")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure_png(fig)


def stage_diversity(ctx: Context) -> dict[str, Any]:
    """Samples every prompt of :data:`PROMPTS` N times per mode and guidance scale; writes the table, plot, grid."""
    from unclip_jax.demo import attributes
    from unclip_jax.demo import stages as demo_stages
    from unclip_jax.evaluate import clip_score
    from unclip_jax.pipeline import images as images_lib

    p = ctx.profile
    n, scales = p.diversity_n, tuple(p.diversity_scales)
    pipe = demo_stages.demo_pipeline(ctx)
    settings = demo_stages.sample_settings(ctx)
    model, variables = attributes.load_classifier(ctx.path("classifier"))
    clip_model, clip_vars = demo_stages.load_clip(ctx)
    embed_img, _ = clip_score.clip_embed_fns(clip_model, clip_vars, image_size=dict(clip_model.vision)["image_size"])
    num_classes = {h: len(attributes.HEADS[h]) for h in FREE_HEADS}
    ctx.command(
        f"diversity.sample(pipe, prompt, mode, scale, n={n}) for prompt in {list(PROMPTS)}, mode in {list(MODES)}, "
        f"scale in {list(scales)}  # decoder outputs; demo CLIP embeddings, attribute classifier"
    )
    per_prompt: dict[str, Any] = {}
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in MODES}
    out_dir = ctx.path("samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_rows, grid_labels = [], []
    for mode in MODES:
        for scale in scales:
            rows = []
            for k, prompt in enumerate(PROMPTS):
                res = sample(pipe, prompt, mode, scale, n, settings, seed=k)
                u8 = images_lib.to_uint8(demo_stages.resize_to(res["decoder_images"], attributes.IMAGE_SIZE))
                pred = attributes.predict(model, variables, u8)
                m = measure(u8, np.asarray(embed_img(u8.astype(np.float32) / 255.0)), pred, num_classes)
                m.update(fidelity(prompt, pred))
                per_prompt[f"{mode}|{scale:g}|{prompt}"] = m
                rows.append(m)
                if k == 0:
                    shown = min(n, 8)
                    grid_rows.append(demo_stages.upscale(res["decoder_images"][:shown], 64))
                    grid_labels += [f"{mode}, s={scale:g}"] + [""] * (shown - 1)
            table[mode][str(float(scale))] = {
                "clip_distance": float(np.mean([r["clip_distance"] for r in rows])),
                "mean_entropy": float(np.mean([r["mean_entropy"] for r in rows])),
                **{f"entropy_{h}": float(np.mean([r["entropy"][h] for r in rows])) for h in FREE_HEADS},
                **{k: float(np.mean([r[k] for r in rows])) for k in ("colour_accuracy", "shape_accuracy")},
            }
            ctx.log(
                f"  {mode} s={scale:g}: CLIP distance {table[mode][str(float(scale))]['clip_distance']:.4f}, "
                f"free-attribute entropy {table[mode][str(float(scale))]['mean_entropy']:.3f} bits"
            )
    (out_dir / "diversity.png").write_bytes(plot(table, scales))
    grid = images_lib.make_grid(np.concatenate(grid_rows), labels=grid_labels, ncols=min(n, 8))
    images_lib.save_png(grid, out_dir / "diversity_grid.png")
    (out_dir / "diversity.json").write_text(json.dumps({"table": table, "per_prompt": per_prompt}, indent=1))
    return {
        "files": ["samples/diversity.png", "samples/diversity_grid.png", "samples/diversity.json"],
        "table": table,
        "prompts": list(PROMPTS),
        "n": n,
        "scales": list(scales),
        "caption_only_source": caption_only_source(),
    }
