"""Do the pictures show the prompts? An attribute classifier for the built-in captioned-shapes set.

A small CNN (:class:`AttributeNet`) is trained on real renderings of
:mod:`unclip_jax.input.synthetic` to read off the ground-truth attributes with one
softmax head per attribute (:data:`HEADS`). It is near-perfect on real held-out images,
so its accuracy on *generated* images, scored against the attributes of the prompts
that produced them, measures how well the cascade follows the captions (the role the
paper's human evaluations and CLIP score play, made exact by a dataset whose captions
come from known scenes).

Canonical object order: a two-object scene has an "a" object (the top one when the
objects are one above the other, the left one when side by side) and a "b" object, so
the heads do not have to guess which object a caption names first. Single-object
scenes put "none" in the b heads, the arrangement head and the two-object slots;
two-object scenes put "none" in the position head.

Scoring (:func:`score`) only counts what a caption says: colour and shape of every
object, count always; size only when the caption says "small"/"large"; background only
when it says "... background"; position (one object) and the relation / arrangement
(two objects) only when a phrase for them is in the caption. Two objects joined by
"and" (no relation) are matched to the prediction in whichever order fits better.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax.input import synthetic
from unclip_jax.layers import axes

NONE = "none"
# head -> class names (the last class of the *_b / position / arrangement heads is "none").
HEADS: dict[str, tuple[str, ...]] = {
    "count": ("one", "two"),
    "background": synthetic.BACKGROUND_NAMES,
    "colour_a": synthetic.COLOUR_NAMES,
    "shape_a": synthetic.SHAPES,
    "size_a": synthetic.SIZE_NAMES,
    "colour_b": (*synthetic.COLOUR_NAMES, NONE),
    "shape_b": (*synthetic.SHAPES, NONE),
    "size_b": (*synthetic.SIZE_NAMES, NONE),
    "position": (*synthetic.POSITION_NAMES, NONE),
    "arrangement": ("vertical", "horizontal", NONE),
}
# Reported attributes (rows of the report's accuracy table).
ATTRIBUTES = ("colour", "shape", "size", "count", "background", "position", "relation")
IMAGE_SIZE = 64

VARIANTS: dict[str, dict[str, Any]] = {
    "test": dict(features=(32, 64, 64), hidden=128),
    "default": dict(features=(32, 64, 128), hidden=256),
}


# ------------------------------------------------------------------------------------------------ labels
def canonical_labels(attrs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Head labels ``{head: int32 [N]}`` from the stored ``attr/*`` arrays of N examples.

    Args:
      attrs: ``{name: [N, ...]}`` with ``num_objects``, ``shape``, ``colour``, ``size`` ([N, 2]),
        ``background``, ``position``, ``relation`` (keys with or without the ``attr/`` prefix).
    """
    a = {k.removeprefix("attr/"): np.asarray(v) for k, v in attrs.items()}
    n_obj = a["num_objects"].reshape(-1).astype(np.int64)
    rel = a["relation"].reshape(-1).astype(np.int64)
    two = n_obj == 2
    # slot of the canonical "a" object: relation "below" / "right of" name the lower / right object first
    first = np.where(two & ((rel == 1) | (rel == 3)), 1, 0)
    second = 1 - first
    idx = np.arange(len(n_obj))
    out = {
        "count": (n_obj - 1),
        "background": a["background"].reshape(-1),
        "position": np.where(two, len(synthetic.POSITION_NAMES), a["position"].reshape(-1)),
        "arrangement": np.where(two, np.where(rel <= 1, 0, 1), 2),
    }
    for name in ("colour", "shape", "size"):
        v = a[name].reshape(len(n_obj), 2)
        out[f"{name}_a"] = v[idx, first]
        out[f"{name}_b"] = np.where(two, v[idx, second], len(HEADS[f"{name}_b"]) - 1)
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


def mentioned(caption: str, num_objects: int) -> dict[str, bool]:
    """Which attributes ``caption`` states (besides colour, shape and count, which every caption states)."""
    words = f" {caption.lower()} "
    rel_phrases = [p for ps in synthetic.RELATION_PHRASES.values() for p in ps] + ["one above the other"]
    rel_phrases += ["side by side"]
    pos_phrases = [p for ps in synthetic.POSITION_PHRASES.values() for p in ps]
    return {
        "colour": True,
        "shape": True,
        "count": True,
        "size": " small " in words or " large " in words,
        "background": " background" in words,
        "position": num_objects == 1 and any(f" {p} " in words for p in pos_phrases),
        "relation": num_objects == 2 and any(f" {p} " in words for p in rel_phrases),
    }


# ------------------------------------------------------------------------------------------------ model
class AttributeNet(nn.Module):
    """A small CNN with one softmax head per attribute.

    A 4x4 stride-2 "patchify" conv (64 -> 32), a 3x3 stride-2 conv (-> 16), a 3x3 conv,
    2x2 average pooling (-> 8), a 3x3 conv (all ReLU), then a dense layer on the flattened
    8x8 map (position and arrangement are spatial) concatenated with its global max (shape
    and colour anywhere), and a linear head per entry of :data:`HEADS`. About 40 MFLOPs per image: trains in a minute on a CPU.

    Attributes:
      features: channels of the three conv stages.
      hidden: width of the dense layer.
      dtype / param_dtype: compute and parameter dtypes.
    """

    features: tuple[int, ...] = (32, 64, 128)
    hidden: int = 256
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Args: images ``[B, 64, 64, 3]`` in [-1, 1]. Returns: ``{head: logits [B, classes]}`` (float32)."""
        conv_init = nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)
        )

        def conv(x, f, k, stride):
            x = nn.Conv(
                f, (k, k), (stride, stride), dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init
            )(x)
            return nn.with_logical_constraint(nn.relu(x), (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED))

        f1, f2, f3 = self.features
        x = conv(images.astype(self.dtype), f1, 4, 2)  # 64 -> 32, patchify
        x = conv(x, f2, 3, 2)  # -> 16
        x = conv(x, f2, 3, 1)
        x = nn.avg_pool(x, (2, 2), (2, 2))  # -> 8
        x = conv(x, f3, 3, 1)
        # flattened map (where things are) + global max (what is there, anywhere)
        x = jnp.concatenate([x.reshape(x.shape[0], -1), x.max(axis=(1, 2))], axis=-1)
        dense = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (axes.EMBED, axes.MLP))
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense)(x))
        head_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (axes.MLP, axes.VOCAB))
        return {
            name: nn.Dense(
                len(classes), dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=head_init, name=name
            )(x).astype(jnp.float32)
            for name, classes in HEADS.items()
        }


def build(variant: str = "default", **overrides: Any) -> AttributeNet:
    """An :class:`AttributeNet` of a variant of :data:`VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(f"attribute classifier variant {variant!r}: expected one of {tuple(VARIANTS)}")
    return AttributeNet(**{**VARIANTS[variant], **overrides})


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` or float in [-1, 1] -> float32 ``[N, 64, 64, 3]`` in [-1, 1] (antialiased resize)."""
    x = np.asarray(images)
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = np.asarray(
            jax.image.resize(jnp.asarray(x), (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), "linear", antialias=True)
        )
    return np.clip(x, -1.0, 1.0)


# ------------------------------------------------------------------------------------------------ training
def train_classifier(
    images: np.ndarray,
    labels: Mapping[str, np.ndarray],
    *,
    variant: str = "default",
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise_std: float = 0.05,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[AttributeNet, dict[str, Any], list[dict[str, float]]]:
    """Trains an :class:`AttributeNet` with the summed cross-entropy of all heads (AdamW, cosine decay).

    Gaussian pixel noise (``noise_std``, random per example in [0, noise_std]) makes the
    classifier tolerant of the grain of generated images without changing what an
    attribute looks like.

    Args:
      images: ``[N, H, W, 3]`` uint8 (or float in [-1, 1]) real images.
      labels: :func:`canonical_labels` of their attributes.
      steps / batch_size / lr / seed: optimisation.
      log_every: print a progress line every this many steps (0: silent).

    Returns:
      (module, variables, history rows ``{"step", "train/loss"}``).
    """
    x_all = to_input(images)
    y_all = {k: np.asarray(labels[k], np.int32) for k in HEADS}
    n = x_all.shape[0]
    model = build(variant)
    rng = jax.random.PRNGKey(seed)
    variables = nn.unbox(model.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps), weight_decay=1e-4)
    opt_state = tx.init(variables)

    def loss_fn(v, x, y):
        logits = model.apply(v, x)
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], y[k]).mean() for k in HEADS]
        return sum(losses)

    @jax.jit
    def step(v, o, x, y, key):
        k1, k2 = jax.random.split(key)
        sigma = jax.random.uniform(k1, (x.shape[0], 1, 1, 1)) * noise_std
        x = x + sigma * jax.random.normal(k2, x.shape)
        loss, g = jax.value_and_grad(loss_fn)(v, x, y)
        updates, o = tx.update(g, o, v)
        return optax.apply_updates(v, updates), o, loss

    history: list[dict[str, float]] = []
    perm_rng = np.random.default_rng(seed)
    order = perm_rng.permutation(n)
    pos = 0
    for s in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = perm_rng.permutation(n), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        variables, opt_state, loss = step(
            variables, opt_state, x_all[idx], {k: v[idx] for k, v in y_all.items()}, jax.random.fold_in(rng, s)
        )
        if log_every and (s % log_every == 0 or s == steps):
            history.append({"step": s, "train/loss": float(loss)})
            print(f"  attribute classifier: step {s}/{steps} loss {float(loss):.4f}", flush=True)
    return model, variables, history


def predict(model: AttributeNet, variables: Any, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class per head ``{head: int32 [N]}`` for images as :func:`to_input` takes them."""
    fn = jax.jit(lambda v, x: {k: jnp.argmax(z, -1) for k, z in model.apply(v, x).items()})
    parts: list[dict[str, np.ndarray]] = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size])
        b = x.shape[0]
        if b < batch_size and len(images) > batch_size:  # one compiled shape
            x = np.concatenate([x, np.zeros((batch_size - b, *x.shape[1:]), x.dtype)])
        parts.append({k: np.asarray(v)[:b] for k, v in fn(variables, x).items()})
    return {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in HEADS}


def save_classifier(folder: str | os.PathLike, model: AttributeNet, variables: Any) -> Path:
    """Writes ``config.json`` (variant fields) + ``params.msgpack`` to ``folder``."""
    from flax import serialization

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"features": list(model.features), "hidden": model.hidden}
    (folder / "params.msgpack").write_bytes(serialization.to_bytes(jax.device_get(variables)))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def load_classifier(folder: str | os.PathLike) -> tuple[AttributeNet, dict[str, Any]]:
    """Reads a folder of :func:`save_classifier`."""
    from flax import serialization

    folder = Path(folder)
    for name in ("config.json", "params.msgpack"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (expected a folder written by save_classifier)")
    cfg = json.loads((folder / "config.json").read_text())
    model = AttributeNet(features=tuple(cfg["features"]), hidden=int(cfg["hidden"]))
    target = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
    return model, serialization.from_bytes(target, (folder / "params.msgpack").read_bytes())


# ------------------------------------------------------------------------------------------------ scoring
def score(
    predictions: Mapping[str, np.ndarray], attrs: Mapping[str, np.ndarray], captions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy of predictions against the scenes the captions describe.

    Args:
      predictions: :func:`predict` output for N images.
      attrs: ``attr/*`` arrays ``[N, ...]`` of the scenes (the prompts' ground truth).
      captions: the N captions (decide which attributes are scored, see the module docstring).

    Returns:
      ``{attribute: {"correct": int, "total": int, "accuracy": float}}`` for :data:`ATTRIBUTES`
      (accuracy is NaN when nothing was scored); colour / shape / size count objects, the
      others images.
    """
    truth = canonical_labels(attrs)
    n = len(captions)
    if any(len(v) != n for v in truth.values()) or any(len(np.asarray(v)) != n for v in predictions.values()):
        raise ValueError(f"score: {n} captions but predictions/attributes of other lengths")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    total = dict.fromkeys(ATTRIBUTES, 0)
    p = {k: np.asarray(v) for k, v in predictions.items()}
    for i, cap in enumerate(captions):
        two = truth["count"][i] == 1
        said = mentioned(cap, 2 if two else 1)

        def obj(src, slot, i=i):
            return tuple(int(src[f"{a}_{slot}"][i]) for a in ("colour", "shape", "size"))

        t_objs = [obj(truth, "a")] + ([obj(truth, "b")] if two else [])
        p_objs = [obj(p, "a")] + ([obj(p, "b")] if two else [])
        if two and not said["relation"]:  # "A and B": either order
            swapped = p_objs[::-1]

            def fit(cands, t_objs=t_objs):
                return sum((c[0] == t[0]) + (c[1] == t[1]) for c, t in zip(cands, t_objs, strict=True))

            if fit(swapped) > fit(p_objs):
                p_objs = swapped
        for j, name in enumerate(("colour", "shape", "size")):
            if said[name]:
                for t, q in zip(t_objs, p_objs, strict=True):
                    correct[name] += int(t[j] == q[j])
                    total[name] += 1
        checks = {
            "count": p["count"][i] == truth["count"][i],
            "background": p["background"][i] == truth["background"][i],
            "position": p["position"][i] == truth["position"][i],
        }
        if two:  # arrangement right, and the top / left object is the one the caption puts there
            checks["relation"] = p["arrangement"][i] == truth["arrangement"][i] and (
                t_objs[0][:2] == t_objs[1][:2] or p_objs[0][:2] == t_objs[0][:2]
            )
        for name, ok in checks.items():
            if said[name]:  # "relation" is only said of two objects
                correct[name] += int(ok)
                total[name] += 1
    return {
        a: {"correct": correct[a], "total": total[a], "accuracy": correct[a] / total[a] if total[a] else float("nan")}
        for a in ATTRIBUTES
    }


def head_accuracy(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Plain accuracy of every head against :func:`canonical_labels` (classifier validation)."""
    return {k: float(np.mean(np.asarray(predictions[k]) == np.asarray(labels[k]))) for k in HEADS}
