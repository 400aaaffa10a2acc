"""Hard-negative captions for contrastive training: the caption with one word swapped within its group.

NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words") adds, for each
image, captions that differ from its own in one detail as extra negatives of the image-to-text softmax. In a batch
of random captions a detail such as an object's shape rarely separates a caption from the others, so the contrastive
loss barely asks the image tower to see it; a negative that differs only in that detail does. The groups are the
words that may replace one another (``data.caption_swaps`` of a CLIP experiment, e.g.
``"circle,square,triangle,cross;circles,squares,triangles,crosses"``): whole words, matched without regard to case.
"""

from __future__ import annotations

import re

import numpy as np

_WORDS = re.compile(r"(\w+)")


def parse_swaps(spec: str, where: str = "data.caption_swaps") -> tuple[tuple[str, ...], ...]:
    """``"a,b,c;d,e"`` -> (("a", "b", "c"), ("d", "e")): groups of two or more words, no word in two groups."""
    if not spec.strip():
        return ()
    groups, seen = [], set()
    for part in spec.split(";"):
        words = tuple(w.strip().lower() for w in part.split(",") if w.strip())
        if len(set(words)) < 2 or len(set(words)) != len(words):
            raise ValueError(f"{where}: group {part.strip()!r} needs two or more distinct comma-separated words")
        bad = [w for w in words if not _WORDS.fullmatch(w)]
        if bad:
            raise ValueError(f"{where}: {bad[0]!r} is not one word (letters, digits, underscores)")
        twice = seen.intersection(words)
        if twice:
            raise ValueError(f"{where}: {sorted(twice)[0]!r} is in two groups")
        seen.update(words)
        groups.append(words)
    return tuple(groups)


def swap_caption(caption: str, groups: tuple[tuple[str, ...], ...], rng: np.random.Generator) -> str | None:
    """``caption`` with one of its group words (chosen by ``rng``) replaced by another word of the same group, or
    None when it has none; the rest of the caption (spacing, punctuation, the other words) is kept as it is."""
    group_of = {w: g for g in groups for w in g}
    parts = _WORDS.split(caption)  # odd indices are the words
    spots = [i for i in range(1, len(parts), 2) if parts[i].lower() in group_of]
    if not spots:
        return None
    i = spots[int(rng.integers(len(spots)))]
    others = [w for w in group_of[parts[i].lower()] if w != parts[i].lower()]
    parts[i] = others[int(rng.integers(len(others)))]
    return "".join(parts)
