"""Hard-negative captions (NegCLIP): the word groups' spelling and the one-word swap."""

from __future__ import annotations

import numpy as np
import pytest

from unclip_jax.input import negatives

SHAPES = "circle,square,triangle,cross;circles,squares,triangles,crosses"


def test_parse_swaps():
    assert negatives.parse_swaps("") == ()
    assert negatives.parse_swaps(" Red, green ;a,b") == (("red", "green"), ("a", "b"))
    for spec, match in (
        ("red", "two or more distinct"),
        ("red,red", "two or more distinct"),
        ("red,dark red", "'dark red' is not one word"),
        ("red,green;green,blue", "'green' is in two groups"),
    ):
        with pytest.raises(ValueError, match=f"data.caption_swaps: .*{match}"):
            negatives.parse_swaps(spec)


def test_swap_changes_one_group_word_and_nothing_else():
    groups = negatives.parse_swaps(SHAPES)
    rng = np.random.default_rng(0)
    caption = "A red Circle above two blue squares, on a white background."
    seen = set()
    for _ in range(200):
        neg = negatives.swap_caption(caption, groups, rng)
        a, b = caption.split(" "), neg.split(" ")
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(changed) == 1, neg
        (x, y) = changed[0]
        if x == "Circle":
            assert y in ("square", "triangle", "cross")
        else:
            assert x == "squares," and y[:-1] in ("circles", "triangles", "crosses") and y.endswith(",")
        seen.add(y)
    assert len(seen) == 6  # every replacement of both words is drawn
    assert negatives.swap_caption("a red dot", groups, rng) is None
    assert negatives.swap_caption("crossroads and encircled", groups, rng) is None  # whole words only
