"""The built-in captioned-shapes dataset: determinism, content that matches captions and attributes."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.input import synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(120, seed=0, sizes=(64, 256))


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


def test_stored_radius_is_the_scene_distributions_radius_of_the_size(data):
    a = data["attributes"]
    want = np.asarray(synthetic.SCENES["standard"].radius, np.float32)[np.maximum(a["size"], 0)]
    np.testing.assert_array_equal(a["radius"], np.where(a["size"] >= 0, want, -1.0))


def _object_pixels(images: np.ndarray, attrs: dict) -> np.ndarray:
    bg = np.asarray([synthetic.BACKGROUNDS[synthetic.BACKGROUND_NAMES[b]] for b in attrs["background"]])
    return (np.abs(images.astype(int) - bg[:, None, None, :]).max(-1) > 0).sum((1, 2))


def test_large_scenes_draw_larger_objects_and_fewer_pairs_of_objects():
    """Same seed, other distribution: the radii, the two-object rate and the drawn area follow ``SCENES["large"]``,
    objects stay inside the image and two objects stay apart along their relation's axis."""
    std = synthetic.generate(400, seed=3, sizes=(64,))
    big = synthetic.generate(400, seed=3, sizes=(64,), scenes="large")
    spec = synthetic.SCENES["large"]
    a = big["attributes"]
    n = a["num_objects"]
    np.testing.assert_array_equal(
        a["radius"][a["size"] >= 0], np.asarray(spec.radius, np.float32)[a["size"][a["size"] >= 0]]
    )
    assert abs((n == 2).mean() - spec.two_object_prob) < 0.07
    assert abs((std["attributes"]["num_objects"] == 2).mean() - synthetic.SCENES["standard"].two_object_prob) < 0.07
    # one-object scenes of each size: the drawn area grows with the radius squared (same shapes on average)
    for k in range(len(synthetic.SIZE_NAMES)):
        area = {}
        for name, d in (("standard", std), ("large", big)):
            one = (d["attributes"]["num_objects"] == 1) & (d["attributes"]["size"][:, 0] == k)
            area[name] = _object_pixels(d["images"][64][one], {kk: v[one] for kk, v in d["attributes"].items()}).mean()
        ratio = (spec.radius[k] / synthetic.SCENES["standard"].radius[k]) ** 2
        assert abs(area["large"] / area["standard"] / ratio - 1) < 0.15, (k, area, ratio)
    for i in range(len(n)):
        for k in range(int(n[i])):
            c, r = a["center"][i, k], a["radius"][i, k]
            assert (c - r > -0.02).all() and (c + r < 1.02).all(), (i, c, r)
        if n[i] == 2:
            axis = 1 if synthetic.RELATIONS[a["relation"][i]] in ("above", "below") else 0
            gap = abs(a["center"][i, 0, axis] - a["center"][i, 1, axis])
            assert gap >= spec.near_far[1] - spec.near_far[0] - 4 * synthetic.JITTER, (i, gap)


def test_unknown_scene_distribution_is_a_clear_error():
    with pytest.raises(ValueError, match=r"synthetic scenes 'huge': expected one of \('standard', 'large'\)"):
        synthetic.example(0, seed=0, scenes="huge")
