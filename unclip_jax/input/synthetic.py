"""The built-in captioned-shapes dataset: no download, deterministic from a seed.

Each image shows one or two flat shapes on a plain background; its caption names what
is drawn, in varied wording, and the ground-truth attributes are stored with it so that
an evaluation can check what a generated image shows (attribute classifier, binding).

Attribute space (kept small so tiny models learn it on a CPU in minutes, but with
enough structure for guidance, diversity and attribute binding):

==============  =====================================================================
shape           circle, square, triangle, cross
colour          red, green, blue, yellow, purple, orange
size            small, large (radii set by the scene distribution, :data:`SCENES`)
background      black, white, gray
count           one object, or two (a "pair" of identical objects 20% of the time)
position        one object: center, left, right, top, bottom
relation        two objects: above, below, left of, right of ("A <rel> B")
==============  =====================================================================

How large the objects are and how often a scene has two of them is a :class:`Scenes` distribution, named in
:data:`SCENES`: ``standard`` (the default) and ``large`` (larger objects, fewer two-object scenes: an easier task
for a model whose output is 32 pixels wide, where a small object of ``standard`` is 7 pixels across).

Captions: e.g. "a small red circle in the center", "a blue square on a white
background", "a red circle above a blue square", "a yellow triangle to the left of a
large green cross", "two purple squares side by side".

Example ``i`` of seed ``s`` depends only on ``(s, i)`` (``np.random.default_rng([s, i])``),
so the dataset is random access and byte-identical across runs, machines and sizes.
Images are drawn on a ``canvas`` x ``canvas`` supersampled canvas (default 512) and
reduced with a box filter (antialiasing), so the 64x64 and 256x256 renderings of an
example show the same scene.

Stored attributes (``attr/...`` fields, -1 where absent; slot 0 is the first-named object):

=====================  ========  =========  =========================================
field                  dtype     shape      meaning
=====================  ========  =========  =========================================
``attr/num_objects``   int32     []         1 or 2
``attr/shape``         int32     [2]        index into :data:`SHAPES`
``attr/colour``        int32     [2]        index into :data:`COLOURS`
``attr/size``          int32     [2]        index into :data:`SIZE_NAMES`
``attr/radius``        float32   [2]        object radius as a fraction of the image side
``attr/center``        float32   [2, 2]     (x, y) of each object in [0, 1]
``attr/background``    int32     []         index into :data:`BACKGROUNDS`
``attr/position``      int32     []         index into :data:`POSITIONS` (one object)
``attr/relation``      int32     []         index into :data:`RELATIONS` (two objects)
=====================  ========  =========  =========================================
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = ("small", "large")
BACKGROUNDS = {"black": (18, 18, 18), "white": (238, 238, 238), "gray": (128, 128, 128)}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
POSITIONS = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
POSITION_NAMES = tuple(POSITIONS)
POSITION_PHRASES = {
    "center": ("in the center", "in the middle"),
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
RELATIONS = ("above", "below", "left of", "right of")
RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
PAIR_PROB = 0.2
JITTER = 0.04


@dataclasses.dataclass(frozen=True)
class Scenes:
    """A distribution of scenes: object radii per size name and how often a scene has two objects.

    ``near_far`` are the two objects' coordinates along the axis of their relation ("above": the first object's
    y is ``near``, the second's ``far``); they keep two large objects apart.
    """

    radius: tuple[float, float] = (0.11, 0.19)  # small, large: fraction of the image side
    two_object_prob: float = 0.5
    near_far: tuple[float, float] = (0.28, 0.72)


DEFAULT_SCENES = "standard"
SCENES: dict[str, Scenes] = {
    "standard": Scenes(),
    "large": Scenes(radius=(0.15, 0.23), two_object_prob=0.3, near_far=(0.25, 0.75)),
}


def scenes_named(name: str) -> Scenes:
    """The :data:`SCENES` entry ``name``; a clear error for any other name."""
    if name not in SCENES:
        raise ValueError(f"synthetic scenes {name!r}: expected one of {tuple(SCENES)}")
    return SCENES[name]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def shape_swaps() -> str:
    """The shape words of the captions as ``data.caption_swaps`` groups (singular; plural): hard-negative captions
    that differ from the true one only in a shape (:mod:`unclip_jax.input.negatives`)."""
    return ",".join(SHAPES) + ";" + ",".join(_plural(s) for s in SHAPES)


def _sample_scene(rng: np.random.Generator, scenes: Scenes) -> dict:
    """Attributes of one example (integers / floats; see the module table)."""
    bg = int(rng.integers(len(BACKGROUNDS)))
    n = 2 if rng.random() < scenes.two_object_prob else 1
    shape = np.full(2, -1, np.int32)
    colour = np.full(2, -1, np.int32)
    size = np.full(2, -1, np.int32)
    center = np.full((2, 2), -1.0, np.float32)
    position = relation = -1
    pair = False
    if n == 1:
        shape[0], colour[0], size[0] = rng.integers(len(SHAPES)), rng.integers(len(COLOURS)), rng.integers(2)
        position = int(rng.integers(len(POSITIONS)))
        center[0] = np.asarray(POSITIONS[POSITION_NAMES[position]]) + rng.uniform(-JITTER, JITTER, 2)
    else:
        relation = int(rng.integers(len(RELATIONS)))
        pair = bool(rng.random() < PAIR_PROB)
        shape[:] = rng.integers(len(SHAPES), size=2)
        colour[:] = rng.integers(len(COLOURS), size=2)
        size[:] = rng.integers(2, size=2)
        if pair:
            shape[1], colour[1], size[1] = shape[0], colour[0], size[0]
        elif shape[0] == shape[1] and colour[0] == colour[1]:
            colour[1] = (colour[1] + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS)
        near, far = scenes.near_far
        free = rng.uniform(0.35, 0.65, 2)
        rel = RELATIONS[relation]
        if rel in ("above", "below"):
            ys = (near, far) if rel == "above" else (far, near)
            center[0], center[1] = (free[0], ys[0]), (free[1], ys[1])
        else:
            xs = (near, far) if rel == "left of" else (far, near)
            center[0], center[1] = (xs[0], free[0]), (xs[1], free[1])
        center[:] += rng.uniform(-JITTER, JITTER, (2, 2))
    radius = np.where(size >= 0, np.asarray(scenes.radius, np.float32)[np.maximum(size, 0)], -1.0)
    return dict(
        num_objects=np.int32(n),
        shape=shape,
        colour=colour,
        size=size,
        radius=radius.astype(np.float32),
        center=center.astype(np.float32),
        background=np.int32(bg),
        position=np.int32(position),
        relation=np.int32(relation),
        pair=pair,
    )


def _caption(rng: np.random.Generator, s: dict) -> str:
    """A caption of the scene in one of several wordings."""
    bg = BACKGROUND_NAMES[s["background"]]

    def obj(k: int, with_size: bool) -> str:
        words = [COLOUR_NAMES[s["colour"][k]], SHAPES[s["shape"][k]]]
        if with_size:
            words.insert(0, SIZE_NAMES[s["size"][k]])
        return " ".join(words)

    def a(phrase: str) -> str:
        return f"a {phrase}"

    if s["num_objects"] == 1:
        pos = POSITION_PHRASES[POSITION_NAMES[s["position"]]][rng.integers(2)]
        templates = (
            lambda: a(obj(0, True)),
            lambda: a(obj(0, False)),
            lambda: f"{a(obj(0, False))} on a {bg} background",
            lambda: f"{a(obj(0, True))} {pos}",
            lambda: f"there is {a(obj(0, True))} {pos}",
            lambda: f"{obj(0, False)}, {bg} background",
            lambda: f"a picture of {a(obj(0, True))} {pos} on a {bg} background",
        )
    elif s["pair"]:
        rel = RELATIONS[s["relation"]]
        arrangement = "one above the other" if rel in ("above", "below") else "side by side"
        name = f"{COLOUR_NAMES[s['colour'][0]]} {_plural(SHAPES[s['shape'][0]])}"
        size = SIZE_NAMES[s["size"][0]]
        templates = (
            lambda: f"two {name}",
            lambda: f"two {size} {name} {arrangement}",
            lambda: f"a pair of {name} on a {bg} background",
            lambda: f"two {name}, {arrangement}",
        )
    else:
        rel = RELATIONS[s["relation"]]
        fwd = RELATION_PHRASES[rel][rng.integers(2)]
        inv = RELATION_PHRASES[INVERSE[rel]][rng.integers(2)]
        templates = (
            lambda: f"{a(obj(0, False))} {fwd} {a(obj(1, False))}",
            lambda: f"{a(obj(0, True))} {fwd} {a(obj(1, True))}",
            lambda: f"{a(obj(0, False))} {fwd} {a(obj(1, False))} on a {bg} background",
            lambda: f"{a(obj(1, False))} {inv} {a(obj(0, False))}",
            lambda: f"{a(obj(0, False))} and {a(obj(1, False))}",
        )
    return templates[rng.integers(len(templates))]()


# Outlines relative to the centre in units of the object's radius (a circle's radius is 1; y points down).
SQUARE_HALF = 0.86
TRIANGLE = ((0.0, -1.0), (-0.95, 0.8), (0.95, 0.8))
CROSS_HALF_WIDTH = 0.36
# Every shape lies within this many radii of its centre (the triangle's base corners reach farthest).
CIRCUMSCRIBED = max(
    1.0,
    float(np.hypot(SQUARE_HALF, SQUARE_HALF)),
    float(np.hypot(1.0, CROSS_HALF_WIDTH)),
    *(float(np.hypot(x, y)) for x, y in TRIANGLE),
)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = SQUARE_HALF * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx + x * r, cy + y * r) for x, y in TRIANGLE], fill=fill)
    elif shape == "cross":
        t = CROSS_HALF_WIDTH * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def render(scene: dict, sizes: tuple[int, ...] = (64,), canvas: int = 512) -> dict[int, np.ndarray]:
    """Draws a scene on a ``canvas``-pixel canvas and box-reduces it to each size.

    Returns:
      {size: uint8 [size, size, 3]}.
    """
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[BACKGROUND_NAMES[scene["background"]]])
    draw = ImageDraw.Draw(img)
    for k in range(int(scene["num_objects"])):
        r = float(scene["radius"][k]) * canvas
        cx, cy = (scene["center"][k] * canvas).tolist()
        _draw(draw, SHAPES[scene["shape"][k]], cx, cy, r, COLOURS[COLOUR_NAMES[scene["colour"][k]]])
    out = {}
    for s in sizes:
        if canvas % s:
            raise ValueError(f"synthetic: canvas {canvas} must be a multiple of every image size, got {s}")
        out[s] = np.asarray(img if s == canvas else img.resize((s, s), resample=Image.BOX))
    return out


def example(
    index: int, seed: int, sizes: tuple[int, ...] = (64,), canvas: int = 512, scenes: str = DEFAULT_SCENES
) -> dict:
    """Example ``index`` of the dataset with ``seed``, drawn from the :data:`SCENES` distribution ``scenes``.

    Returns:
      dict(id str, caption str, image uint8 [sizes[0], sizes[0], 3],
      image_<size> for every size, attr/<name> arrays of the module table).
    """
    spec = scenes_named(scenes)
    rng = np.random.default_rng([seed, index])
    scene = _sample_scene(rng, spec)
    caption = _caption(rng, scene)
    images = render(scene, sizes, canvas)
    out: dict = {"id": f"synthetic-{seed}-{index:08d}", "caption": caption, "image": images[sizes[0]]}
    for s, im in images.items():
        out[f"image_{s}"] = im
    for k, v in scene.items():
        if k != "pair":
            out[f"attr/{k}"] = np.asarray(v)
    return out


def generate(
    num_examples: int, seed: int, sizes: tuple[int, ...] = (64,), canvas: int = 512, scenes: str = DEFAULT_SCENES
) -> dict:
    """Generates examples ``0 .. num_examples-1`` (of the :data:`SCENES` distribution ``scenes``) as stacked arrays.

    Returns:
      dict(ids list[str], captions list[str], images {size: uint8 [N, size, size, 3]},
      attributes {name: [N, ...]}).
    """
    exs = [example(i, seed, sizes, canvas, scenes) for i in range(num_examples)]
    return dict(
        ids=[e["id"] for e in exs],
        captions=[e["caption"] for e in exs],
        images={s: np.stack([e[f"image_{s}"] for e in exs]) for s in sizes},
        attributes={k[5:]: np.stack([e[k] for e in exs]) for k in exs[0] if k.startswith("attr/")},
    )
