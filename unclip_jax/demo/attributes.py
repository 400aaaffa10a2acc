"""Do the pictures show the prompts? The demo's attribute classifier for the built-in captioned-shapes set.

A small fully convolutional detector (:class:`AttributeNet`) is trained on real renderings
of :mod:`unclip_jax.input.synthetic` to find the objects (objectness peaks) and read their
colour, shape and size cell by cell; :func:`decode` turns that into one class per
attribute head (:data:`HEADS`). Its accuracy on real held-out images is the demo report's
reference row; its accuracy on *generated* images, scored against the attributes of the prompts
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
GRID = 16  # the detector's output grid (stride 4 at 64x64)
SIGMA = 0.05  # width of the objectness peaks (fraction of the image side)
INSIDE = 0.07  # grid cells this close to an object's centre (fraction of the image side) learn its attributes
SUPPRESS = 0.22  # a second object's peak lies at least this far from the first (the dataset puts them ~0.44 apart)
TWO_THRESHOLD = 0.3  # objectness of the second peak above which an image shows two objects
CELL_HEADS = {"colour": synthetic.COLOUR_NAMES, "shape": synthetic.SHAPES, "size": synthetic.SIZE_NAMES}

VARIANTS: dict[str, dict[str, Any]] = {
    "test": dict(features=(16, 32, 48)),
    "default": dict(features=(24, 48, 64)),
}


class AttributeNet(nn.Module):
    """A small fully convolutional object detector (CenterNet-style, Zhou et al. 2019) for the shapes set.

    A 4x4 stride-2 conv (64 -> 32), a 3x3 stride-2 conv (-> 16), then three 3x3 convs at 16x16
    with dilations 1, 2, 4 (receptive field 64 pixels) and a 1x1 conv, all ReLU. Per cell of the
    16x16 grid it predicts an objectness logit (a Gaussian peak at each object's centre) and the
    colour / shape / size of the object covering the cell; a global average of the features
    gives the background. Attributes are read locally (the same weights everywhere), so objects
    drawn in unusual places are read like any other; :func:`decode` turns the maps into the
    per-attribute heads of :data:`HEADS`. Saved and loaded in the native format
    (:func:`save_classifier`, :func:`load_classifier`).

    Attributes:
      features: channels of the 32x32 stage, the 16x16 stride-2 conv and the 16x16 stages.
      dtype / param_dtype: compute and parameter dtypes.
    """

    features: tuple[int, ...] = (24, 48, 64)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Args: images ``[B, 64, 64, 3]`` in [-1, 1].

        Returns:
          float32 ``objectness [B, 16, 16]`` (logits), ``colour / shape / size [B, 16, 16, classes]``
          (logits) and ``background [B, 3]`` (logits).
        """
        conv_init = nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.KERNEL_H, axes.KERNEL_W, axes.CONV_IN, axes.CONV_OUT)
        )

        def conv(x, f, k, stride=1, dilation=1, relu=True, name=None):
            x = nn.Conv(
                f,
                (k, k),
                (stride, stride),
                kernel_dilation=(dilation, dilation),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=conv_init,
                name=name,
            )(x)
            if relu:
                x = nn.relu(nn.GroupNorm(num_groups=8, dtype=self.dtype, param_dtype=self.param_dtype)(x))
            return nn.with_logical_constraint(x, (axes.BATCH, axes.HEIGHT, axes.WIDTH, axes.ACT_EMBED))

        f1, f2, f3 = self.features
        x = conv(images.astype(self.dtype), f1, 4, 2)  # 64 -> 32
        x = conv(x, f2, 3, 2)  # -> 16
        x = conv(x, f3, 3)
        x = conv(x, f3, 3, dilation=2)
        x = conv(x, f3, 3, dilation=4)
        x = conv(x, f3, 1)
        sizes = [1] + [len(v) for v in CELL_HEADS.values()]
        maps = conv(x, sum(sizes), 1, relu=False, name="cells").astype(jnp.float32)
        parts = jnp.split(maps, np.cumsum(sizes)[:-1], axis=-1)
        out = {"objectness": parts[0][..., 0]}
        out.update({name: p for name, p in zip(CELL_HEADS, parts[1:], strict=True)})
        head_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (axes.MLP, axes.VOCAB))
        out["background"] = nn.Dense(
            len(synthetic.BACKGROUND_NAMES),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=head_init,
            name="background",
        )(x.mean(axis=(1, 2))).astype(jnp.float32)
        return out


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


def _cell_centres() -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the grid cells' centres, each ``[GRID, GRID]`` (row = y) in [0, 1]."""
    g = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID
    return np.meshgrid(g, g)


def cell_targets(attrs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Training targets of :class:`AttributeNet` from the stored ``attr/*`` arrays of N scenes.

    Returns:
      ``objectness [N, G, G]`` (max over objects of a Gaussian of width :data:`SIGMA` at the
      centre), ``mask [N, G, G]`` (1 where the cell lies inside an object: its attributes are
      learned there), ``colour / shape / size [N, G, G]`` (int32, of the nearest object) and
      ``background [N]``.
    """
    a = {k.removeprefix("attr/"): np.asarray(v) for k, v in attrs.items()}
    missing = [k for k in ("num_objects", "center", "colour", "shape", "size", "background") if k not in a]
    if missing:
        raise KeyError(f"cell_targets: attributes lack {missing} (have {sorted(a)})")
    n_obj = a["num_objects"].reshape(-1)
    n = len(n_obj)
    centre = a["center"].reshape(n, 2, 2).astype(np.float32)
    cx, cy = _cell_centres()
    d2 = (cx[None, None] - centre[:, :, 0, None, None]) ** 2 + (cy[None, None] - centre[:, :, 1, None, None]) ** 2
    valid = np.arange(2)[None, :] < n_obj[:, None]  # [N, 2]
    d2 = np.where(valid[:, :, None, None], d2, np.inf)  # [N, 2, G, G]
    nearest = np.argmin(d2, axis=1)  # [N, G, G]
    dmin = np.min(d2, axis=1)

    def of_nearest(v):
        return np.take_along_axis(v.reshape(n, 2)[:, :, None, None], nearest[:, None], axis=1)[:, 0]

    size = of_nearest(a["size"])
    mask = dmin < INSIDE**2
    out = {
        "objectness": np.exp(-dmin / (2 * SIGMA**2)).astype(np.float32),
        "mask": mask.astype(np.float32),
        "colour": of_nearest(a["colour"]),
        "shape": of_nearest(a["shape"]),
        "size": size,
    }
    out = {k: np.where(np.isfinite(v), v, 0) if v.dtype.kind == "f" else np.clip(v, 0, None) for k, v in out.items()}
    out = {k: v.astype(np.float32 if k in ("objectness", "mask") else np.int32) for k, v in out.items()}
    out["background"] = a["background"].reshape(-1).astype(np.int32)
    return out


def decode(maps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-attribute heads (:data:`HEADS`, canonical object order) from the maps of :class:`AttributeNet`.

    The first object is the objectness peak; the second is the highest peak at least
    :data:`SUPPRESS` away from it, counted when its objectness exceeds :data:`TWO_THRESHOLD`.
    An object's centre is the objectness-weighted mean of its 3x3 neighbourhood of cells and
    its colour / shape / size the class of the summed, objectness-weighted probabilities there.
    One object: its position is the nearest of :data:`synthetic.POSITIONS`; two: they are
    arranged vertically when their centres differ more in y than in x, and the top / left one
    is the "a" object.
    """
    heat = 1.0 / (1.0 + np.exp(-np.asarray(maps["objectness"], np.float64)))  # [N, G, G]
    n = heat.shape[0]
    probs = {}
    for k in CELL_HEADS:
        z = np.asarray(maps[k], np.float64)
        z = np.exp(z - z.max(-1, keepdims=True))
        probs[k] = z / z.sum(-1, keepdims=True)
    cx, cy = _cell_centres()
    flat = heat.reshape(n, -1)
    i1 = flat.argmax(-1)
    d2 = (cx.reshape(-1)[None] - cx.reshape(-1)[i1][:, None]) ** 2 + (
        cy.reshape(-1)[None] - cy.reshape(-1)[i1][:, None]
    ) ** 2
    i2 = np.where(d2 < SUPPRESS**2, -1.0, flat).argmax(-1)
    two = flat[np.arange(n), i2] > TWO_THRESHOLD

    def read(idx):
        """centre [N, 2] and attribute classes {name: [N]} around cell idx [N]."""
        r, c = np.divmod(idx, GRID)
        w = np.zeros_like(heat)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                rr, cc = np.clip(r + dr, 0, GRID - 1), np.clip(c + dc, 0, GRID - 1)
                w[np.arange(n), rr, cc] = heat[np.arange(n), rr, cc]
        w = w / np.maximum(w.sum((1, 2), keepdims=True), 1e-9)
        centre = np.stack([(w * cx).sum((1, 2)), (w * cy).sum((1, 2))], -1)
        cls = {k: np.einsum("ngh,nghc->nc", w, p).argmax(-1) for k, p in probs.items()}
        return centre, cls

    c1, a1 = read(i1)
    c2, a2 = read(i2)
    vertical = np.abs(c2[:, 1] - c1[:, 1]) > np.abs(c2[:, 0] - c1[:, 0])
    swap = two & np.where(vertical, c2[:, 1] < c1[:, 1], c2[:, 0] < c1[:, 0])  # second peak is the top / left one
    pos = np.asarray(list(synthetic.POSITIONS.values()), np.float64)
    nearest_pos = np.argmin(((c1[:, None] - pos[None]) ** 2).sum(-1), -1)
    out = {
        "count": two.astype(np.int32),
        "background": np.asarray(maps["background"]).argmax(-1),
        "position": np.where(two, len(synthetic.POSITION_NAMES), nearest_pos),
        "arrangement": np.where(two, np.where(vertical, 0, 1), 2),
    }
    for k in CELL_HEADS:
        first = np.where(swap, a2[k], a1[k])
        second = np.where(swap, a1[k], a2[k])
        out[f"{k}_a"] = first
        out[f"{k}_b"] = np.where(two, second, len(HEADS[f"{k}_b"]) - 1)
    return {k: np.asarray(out[k], np.int32) for k in HEADS}


# ------------------------------------------------------------------------------------------------ training
def train_classifier(
    images: np.ndarray,
    attrs: Mapping[str, np.ndarray],
    *,
    variant: str = "default",
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    noise_std: float = 0.08,
    seed: int = 0,
    log_every: int = 0,
) -> tuple[AttributeNet, dict[str, Any], list[dict[str, float]]]:
    """Trains an :class:`AttributeNet` on real images (AdamW, warm-up + cosine decay).

    Loss: binary cross-entropy of the objectness maps against :func:`cell_targets` (x 16),
    cross-entropy of colour / shape / size on the cells inside objects, and of the
    background. Augmentation: Gaussian pixel noise (random per example in [0, noise_std])
    and a random blend with a 3x3 box blur, so that the grain and softness of generated
    images do not change what the classifier reads.

    Args:
      images: ``[N, H, W, 3]`` uint8 (or float in [-1, 1]) real images.
      attrs: their ``attr/*`` arrays (with or without the prefix; see :func:`cell_targets`).
      steps / batch_size / lr / seed: optimisation.
      log_every: print a progress line every this many steps (0: silent).

    Returns:
      (module, variables, history rows ``{"step", "train/loss"}``).
    """
    x_all = to_input(images)
    y_all = cell_targets(attrs)
    n = x_all.shape[0]
    model = build(variant)
    rng = jax.random.PRNGKey(seed)
    variables = nn.unbox(model.init(rng, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps), weight_decay=1e-4)
    opt_state = tx.init(variables)

    def loss_fn(v, x, y):
        out = model.apply(v, x)
        obj = optax.sigmoid_binary_cross_entropy(out["objectness"], y["objectness"]).mean() * 16.0
        m = y["mask"]
        cells = [
            (optax.softmax_cross_entropy_with_integer_labels(out[k], y[k]) * m).sum() / jnp.maximum(m.sum(), 1.0)
            for k in CELL_HEADS
        ]
        bg = optax.softmax_cross_entropy_with_integer_labels(out["background"], y["background"]).mean()
        return obj + sum(cells) + bg

    @jax.jit
    def step(v, o, x, y, key):
        k1, k2, k3 = jax.random.split(key, 3)
        blur = nn.avg_pool(x, (3, 3), (1, 1), padding="SAME", count_include_pad=False)
        x = x + jax.random.uniform(k3, (x.shape[0], 1, 1, 1)) * (blur - x)
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


def predict_maps(
    model: AttributeNet, variables: Any, images: np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """The raw maps of :class:`AttributeNet` (numpy) for images as :func:`to_input` takes them."""
    fn = jax.jit(model.apply)
    parts: list[dict[str, np.ndarray]] = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i : i + batch_size])
        b = x.shape[0]
        if b < batch_size and len(images) > batch_size:  # one compiled shape
            x = np.concatenate([x, np.zeros((batch_size - b, *x.shape[1:]), x.dtype)])
        parts.append({k: np.asarray(v)[:b] for k, v in fn(variables, x).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def predict(model: AttributeNet, variables: Any, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Predicted class per head ``{head: int32 [N]}`` (:data:`HEADS`) for images as :func:`to_input` takes them."""
    return decode(predict_maps(model, variables, images, batch_size))


def save_classifier(folder: str | os.PathLike, model: AttributeNet, variables: Any) -> Path:
    """Writes the classifier as a native folder (:func:`unclip_jax.convert.native.save_native`)."""
    from unclip_jax.convert.native import save_native

    return save_native(model, variables, folder)


def load_classifier(folder: str | os.PathLike) -> tuple[AttributeNet, dict[str, Any]]:
    """Reads a folder of :func:`save_classifier`.

    Raises:
      ConversionError: naming the folder when it is not a native folder of an :class:`AttributeNet`.
    """
    from unclip_jax.convert.io import ConversionError
    from unclip_jax.convert.native import is_native, load_native

    if not is_native(folder):
        raise ConversionError(f"{folder}: not a native classifier folder; delete it and re-run to retrain")
    model, variables = load_native(folder, packages=(__name__,))
    if not isinstance(model, AttributeNet):
        raise ConversionError(f"{folder}: holds a {type(model).__name__}, expected the demo's AttributeNet")
    return model, variables


# ------------------------------------------------------------------------------------------------ scoring
OBJECT_ATTRIBUTES = ("colour", "shape", "size")  # read per object; the others per image


def _scored(
    predictions: Mapping[str, np.ndarray], attrs: Mapping[str, np.ndarray], captions: Sequence[str]
) -> tuple[list[tuple[str, int, int]], dict[str, list[bool]]]:
    """What :func:`score` counts: ``(attribute, true class, predicted class)`` per object attribute a caption names
    (two objects matched in caption order, or in either order when no relation is said), and the per-image checks."""
    truth = canonical_labels(attrs)
    n = len(captions)
    if any(len(v) != n for v in truth.values()) or any(len(np.asarray(v)) != n for v in predictions.values()):
        raise ValueError(f"score: {n} captions but predictions/attributes of other lengths")
    pairs: list[tuple[str, int, int]] = []
    checks: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES if a not in OBJECT_ATTRIBUTES}
    p = {k: np.asarray(v) for k, v in predictions.items()}
    for i, cap in enumerate(captions):
        two = truth["count"][i] == 1
        said = mentioned(cap, 2 if two else 1)

        def obj(src, slot, i=i):
            return tuple(int(src[f"{a}_{slot}"][i]) for a in OBJECT_ATTRIBUTES)

        t_objs = [obj(truth, "a")] + ([obj(truth, "b")] if two else [])
        p_objs = [obj(p, "a")] + ([obj(p, "b")] if two else [])
        if two and not said["relation"]:  # "A and B": either order
            swapped = p_objs[::-1]

            def fit(cands, t_objs=t_objs):
                return sum((c[0] == t[0]) + (c[1] == t[1]) for c, t in zip(cands, t_objs, strict=True))

            if fit(swapped) > fit(p_objs):
                p_objs = swapped
        for j, name in enumerate(OBJECT_ATTRIBUTES):
            if said[name]:
                pairs += [(name, t[j], q[j]) for t, q in zip(t_objs, p_objs, strict=True)]
        image_checks = {
            "count": p["count"][i] == truth["count"][i],
            "background": p["background"][i] == truth["background"][i],
            "position": p["position"][i] == truth["position"][i],
        }
        if two:  # arrangement right, and the top / left object is the one the caption puts there
            image_checks["relation"] = p["arrangement"][i] == truth["arrangement"][i] and (
                t_objs[0][:2] == t_objs[1][:2] or p_objs[0][:2] == t_objs[0][:2]
            )
        for name, ok in image_checks.items():
            if said[name]:  # "relation" is only said of two objects
                checks[name].append(bool(ok))
    return pairs, checks


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
    pairs, checks = _scored(predictions, attrs, captions)
    outcomes = {a: [t == q for name, t, q in pairs if name == a] for a in OBJECT_ATTRIBUTES} | checks
    return {
        a: {
            "correct": int(sum(outcomes[a])),
            "total": len(outcomes[a]),
            "accuracy": sum(outcomes[a]) / len(outcomes[a]) if outcomes[a] else float("nan"),
        }
        for a in ATTRIBUTES
    }


def confusion(
    predictions: Mapping[str, np.ndarray],
    attrs: Mapping[str, np.ndarray],
    captions: Sequence[str],
    attribute: str = "shape",
) -> np.ndarray:
    """``[K, K + 1]`` counts of the objects :func:`score` scores for an object attribute: row the class the caption
    asks for (the K classes of ``HEADS[attribute + "_a"]``), column the class the classifier reads, the last column
    "none" (a second object it did not find; ``HEADS[attribute + "_b"]``). Its trace over its sum is :func:`score`'s
    accuracy; the off-diagonal says *which* class is drawn instead (a decoder that rounds every square and cross into
    a blob fills the circle column)."""
    if attribute not in OBJECT_ATTRIBUTES:
        raise ValueError(f"confusion: attribute {attribute!r}: expected one of {OBJECT_ATTRIBUTES}")
    k = len(HEADS[f"{attribute}_a"])
    counts = np.zeros((k, k + 1), np.int64)
    for name, t, q in _scored(predictions, attrs, captions)[0]:
        if name == attribute:
            counts[t, q] += 1
    return counts


def head_accuracy(predictions: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Plain accuracy of every head against :func:`canonical_labels` (classifier validation)."""
    return {k: float(np.mean(np.asarray(predictions[k]) == np.asarray(labels[k]))) for k in HEADS}
