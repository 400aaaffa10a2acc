"""The built-in captioned-shapes dataset: determinism, content that matches captions and attributes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from unclip_jax.input import synthetic


@pytest.fixture(scope="module")
def data():
    t0 = time.perf_counter()
    d = synthetic.generate(120, seed=0, sizes=(64, 256))
    d["seconds"] = time.perf_counter() - t0
    return d


def _bytes(d) -> bytes:
    parts = [d["images"][s].tobytes() for s in sorted(d["images"])]
    parts += ["\n".join(d["captions"]).encode()]
    parts += [d["attributes"][k].tobytes() for k in sorted(d["attributes"])]
    return b"".join(parts)


def test_same_seed_is_byte_identical_other_seed_differs(data):
    again = synthetic.generate(120, seed=0, sizes=(64, 256))
    assert _bytes(again) == _bytes({k: data[k] for k in ("images", "captions", "attributes")})
    other = synthetic.generate(120, seed=1, sizes=(64, 256))
    assert not np.array_equal(other["images"][64], data["images"][64])
    assert other["captions"] != data["captions"]


def test_random_access_does_not_depend_on_dataset_size(data):
    ex = synthetic.example(101, seed=0, sizes=(64,))
    np.testing.assert_array_equal(ex["image"], data["images"][64][101])
    assert ex["caption"] == data["captions"][101]


def test_shapes_dtypes_and_attribute_space(data):
    assert data["images"][64].shape == (120, 64, 64, 3) and data["images"][64].dtype == np.uint8
    assert data["images"][256].shape == (120, 256, 256, 3)
    a = data["attributes"]
    n = a["num_objects"]
    assert set(np.unique(n)) == {1, 2}
    assert set(np.unique(a["shape"][:, 0])) == set(range(len(synthetic.SHAPES)))
    assert set(np.unique(a["colour"][:, 0])) == set(range(len(synthetic.COLOURS)))
    assert (a["shape"][n == 1, 1] == -1).all() and (a["relation"][n == 1] == -1).all()
    assert (a["relation"][n == 2] >= 0).all() and (a["position"][n == 2] == -1).all()
    assert len(set(data["captions"])) > 60  # varied wording


def test_captions_name_the_drawn_attributes(data):
    a = data["attributes"]
    for i, cap in enumerate(data["captions"]):
        for k in range(int(a["num_objects"][i])):
            colour = synthetic.COLOUR_NAMES[a["colour"][i, k]]
            shape = synthetic.SHAPES[a["shape"][i, k]]
            assert colour in cap and shape in cap, (cap, colour, shape)


def test_pixels_show_the_object_colour_at_its_centre(data):
    """The object's colour is at its centre (circle / square / cross cover it) in both resolutions."""
    a = data["attributes"]
    checked = 0
    for i in range(120):
        for k in range(int(a["num_objects"][i])):
            if synthetic.SHAPES[a["shape"][i, k]] == "triangle":
                continue  # its centroid is not the drawing centre
            want = np.asarray(synthetic.COLOURS[synthetic.COLOUR_NAMES[a["colour"][i, k]]])
            for s in (64, 256):
                x, y = (a["center"][i, k] * s).astype(int)
                np.testing.assert_array_equal(data["images"][s][i, y, x], want)
            checked += 1
    assert checked > 60


def test_64_and_256_show_the_same_scene(data):
    """Both are box reductions of one canvas, so 4x4-averaging the 256 gives the 64 (up to uint8 rounding)."""
    hi = data["images"][256].astype(np.float32).reshape(120, 64, 4, 64, 4, 3).mean((2, 4))
    assert np.abs(hi - data["images"][64]).max() <= 1.0


def test_relations_hold_in_the_geometry(data):
    a = data["attributes"]
    for i in np.nonzero(a["num_objects"] == 2)[0]:
        rel = synthetic.RELATIONS[a["relation"][i]]
        (x0, y0), (x1, y1) = a["center"][i]
        ok = {"above": y0 < y1, "below": y0 > y1, "left of": x0 < x1, "right of": x0 > x1}[rel]
        assert ok, (rel, a["center"][i])


def test_generation_is_fast(data):
    # 120 examples at 64 and 256 px; a few thousand at 64 px take seconds.
    assert data["seconds"] < 15, data["seconds"]
