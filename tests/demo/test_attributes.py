"""The attribute classifier of the demo: labels, scoring rules, and near-perfect accuracy on real held-out images."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.demo import attributes
from unclip_jax.input import synthetic


@pytest.fixture(scope="module")
def val():
    return synthetic.generate(300, seed=11, sizes=(64,), canvas=256)


def test_canonical_labels_put_the_top_or_left_object_first(val):
    lab = attributes.canonical_labels(val["attributes"])
    a = val["attributes"]
    for i in range(len(val["captions"])):
        if a["num_objects"][i] == 1:
            assert lab["colour_b"][i] == len(attributes.HEADS["colour_b"]) - 1
            assert lab["arrangement"][i] == 2 and lab["position"][i] == a["position"][i]
            continue
        c = a["center"][i]
        vertical = synthetic.RELATIONS[a["relation"][i]] in ("above", "below")
        first = int(np.argmin(c[:, 1] if vertical else c[:, 0]))  # the top / left object, from the geometry
        assert lab["colour_a"][i] == a["colour"][i, first] and lab["shape_a"][i] == a["shape"][i, first]
        assert lab["colour_b"][i] == a["colour"][i, 1 - first]
        assert lab["arrangement"][i] == (0 if vertical else 1)
        assert lab["position"][i] == len(synthetic.POSITION_NAMES)


def test_score_counts_only_what_captions_say(val):
    lab = attributes.canonical_labels(val["attributes"])
    perfect = attributes.score(lab, val["attributes"], val["captions"])
    assert all(v["accuracy"] == 1.0 for v in perfect.values() if v["total"])
    n = len(val["captions"])
    n_obj = val["attributes"]["num_objects"]
    assert perfect["count"]["total"] == n
    assert perfect["colour"]["total"] == int(n_obj.sum())  # every object's colour is named
    said_bg = sum("background" in c for c in val["captions"])
    assert perfect["background"]["total"] == said_bg < n
    assert 0 < perfect["size"]["total"] < perfect["colour"]["total"]

    # a wrong background is only penalised where the caption names one
    wrong = dict(lab, background=(lab["background"] + 1) % 3)
    s = attributes.score(wrong, val["attributes"], val["captions"])
    assert s["background"]["correct"] == 0 and s["colour"]["accuracy"] == 1.0


def test_score_accepts_either_order_only_without_a_relation():
    scene = dict(
        num_objects=np.array([2, 2]),
        shape=np.array([[0, 1], [0, 1]]),
        colour=np.array([[0, 2], [0, 2]]),
        size=np.array([[0, 1], [0, 1]]),
        background=np.array([0, 0]),
        position=np.array([-1, -1]),
        relation=np.array([2, 2]),  # "left of": slot 0 is on the left
    )
    captions = ["a red circle and a blue square", "a red circle to the left of a blue square"]
    lab = attributes.canonical_labels(scene)
    swapped = dict(lab)
    for k in ("colour", "shape", "size"):
        swapped[f"{k}_a"], swapped[f"{k}_b"] = lab[f"{k}_b"], lab[f"{k}_a"]
    s0 = attributes.score({k: v[:1] for k, v in swapped.items()}, {k: v[:1] for k, v in scene.items()}, captions[:1])
    assert s0["colour"]["accuracy"] == 1.0 and s0["shape"]["accuracy"] == 1.0 and s0["relation"]["total"] == 0
    s1 = attributes.score({k: v[1:] for k, v in swapped.items()}, {k: v[1:] for k, v in scene.items()}, captions[1:])
    assert s1["colour"]["accuracy"] == 0.0 and s1["relation"]["accuracy"] == 0.0


def test_decode_of_ideal_maps_gives_the_canonical_labels(val):
    """The detector's read-out: maps equal to the training targets decode to every head's true class."""
    t = attributes.cell_targets(val["attributes"])
    p = np.clip(t["objectness"], 1e-4, 1 - 1e-4)
    maps = {"objectness": np.log(p / (1 - p)), "background": 10.0 * np.eye(3)[t["background"]]}
    for k, names in attributes.CELL_HEADS.items():
        maps[k] = 10.0 * np.eye(len(names))[t[k]]
    acc = attributes.head_accuracy(attributes.decode(maps), attributes.canonical_labels(val["attributes"]))
    assert min(acc.values()) >= 0.99, acc
    assert acc["colour_a"] == acc["shape_a"] == acc["count"] == 1.0, acc
    # a blank map finds one object (count "one") and names no second one
    blank = {k: np.zeros_like(v) for k, v in maps.items()}
    blank["objectness"] = np.full_like(maps["objectness"], -10.0)
    pred = attributes.decode(blank)
    assert (pred["count"] == 0).all() and (pred["colour_b"] == len(attributes.HEADS["colour_b"]) - 1).all()


@pytest.mark.slow
def test_classifier_is_near_perfect_on_real_held_out_images(val, tmp_path):
    train = synthetic.generate(2500, seed=10, sizes=(64,), canvas=256)
    model, variables, hist = attributes.train_classifier(
        train["images"][64], train["attributes"], variant="default", steps=300, log_every=300
    )
    assert hist and np.isfinite(hist[-1]["train/loss"])
    folder = attributes.save_classifier(tmp_path / "cls", model, variables)
    model2, variables2 = attributes.load_classifier(folder)
    pred = attributes.predict(model2, variables2, val["images"][64])
    s = attributes.score(pred, val["attributes"], val["captions"])
    print({k: round(v["accuracy"], 3) for k, v in s.items()})
    for name in ("colour", "shape", "size", "count", "background", "position"):
        assert s[name]["accuracy"] >= 0.95, (name, s[name])
    assert s["relation"]["accuracy"] >= 0.9, s["relation"]
    # float inputs in [-1, 1] and other sizes go through the same resize
    as_float = val["images"][64][:8].astype(np.float32) / 127.5 - 1.0
    p2 = attributes.predict(model2, variables2, as_float)
    assert all(np.array_equal(p2[k], pred[k][:8]) for k in attributes.HEADS)


def test_confusion_says_which_shape_is_read_instead(val):
    lab = attributes.canonical_labels(val["attributes"])
    k = len(synthetic.SHAPES)
    perfect = attributes.confusion(lab, val["attributes"], val["captions"])
    s = attributes.score(lab, val["attributes"], val["captions"])
    assert perfect.shape == (k, k + 1)
    assert perfect.sum() == np.trace(perfect) == s["shape"]["total"]
    # every shape read as a circle, and every second object missed: the circle column and the "none" column
    circles = dict(lab, shape_a=np.zeros_like(lab["shape_a"]), count=np.zeros_like(lab["count"]))
    circles["shape_b"] = np.full_like(lab["shape_b"], k)
    c = attributes.confusion(circles, val["attributes"], val["captions"])
    two = val["attributes"]["num_objects"] == 2
    assert c.sum() == perfect.sum()
    assert c[:, k].sum() == int(two.sum())  # the b objects of two-object scenes (every caption names shapes)
    assert c[:, 1:k].sum() == 0 and c[:, 0].sum() == c.sum() - int(two.sum())
    assert np.trace(c) / c.sum() == attributes.score(circles, val["attributes"], val["captions"])["shape"]["accuracy"]
    with pytest.raises(ValueError, match="count"):
        attributes.confusion(lab, val["attributes"], val["captions"], attribute="count")
