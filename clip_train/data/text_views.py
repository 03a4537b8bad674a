"""Two text views of one sample for the intra-modal text term (SLIP / CleanCLIP style).

A sample with several captions (a list, or a retrieval-style ``.txt`` with one caption per
line) gives two *different* captions; a single caption gives two word-dropout views.
Everything is driven by an explicit ``random.Random`` so a seeded worker is reproducible.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple, Union


def word_dropout(caption: str, p: float, rng: random.Random, min_words: int = 1) -> str:
    """Delete each whitespace-separated word independently with probability ``p``.

    At least ``min(min_words, number of words)`` words are kept (dropped words are put back
    at random, in their original order), so a non-blank caption never becomes empty.  The
    kept words are joined by single spaces; ``p == 0`` returns ``caption`` unchanged, and a
    blank caption is returned as is.  Deterministic for a seeded ``rng``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"word dropout p must be in [0, 1], got {p}")
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}")
    words = caption.split()
    if p == 0 or not words:
        return caption
    keep = [rng.random() >= p for _ in words]
    missing = min(min_words, len(words)) - sum(keep)
    if missing > 0:
        dropped = [i for i, k in enumerate(keep) if not k]
        for i in rng.sample(dropped, missing):
            keep[i] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def caption_list(captions: Union[str, Sequence[str]]) -> List[str]:
    """The distinct non-blank captions of a sample (a string: one caption per line)."""
    items = captions.splitlines() if isinstance(captions, str) else list(captions)
    out: List[str] = []
    for c in items:
        c = c.strip()
        if c and c not in out:
            out.append(c)
    return out


def two_text_views(
    captions_or_caption_list: Union[str, Sequence[str]], p: float, rng: random.Random
) -> Tuple[str, str]:
    """``(view1, view2)``: two different captions drawn at random when the sample has at
    least two distinct ones, otherwise two independent :func:`word_dropout` views (rate
    ``p``) of its only caption."""
    caps = caption_list(captions_or_caption_list)
    if not caps:
        raise ValueError("sample has no non-blank caption")
    if len(caps) >= 2:
        i, j = rng.sample(range(len(caps)), 2)
        return caps[i], caps[j]
    return word_dropout(caps[0], p, rng), word_dropout(caps[0], p, rng)
