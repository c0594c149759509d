"""Shared fixtures of the fine-tuning tests."""

from __future__ import annotations

import json
import random

import pytest

WORDS = {
    "positive": ["good", "great", "superb", "lovely", "fine", "moving"],
    "negative": ["bad", "awful", "dull", "poor", "boring", "weak"],
}
FILLER = ["the", "film", "was", "a", "story", "with", "actors", "and", "plot", "this"]


def write_sentiment_file(path, n: int, seed: int) -> list[dict]:
    """A JSONL set a tiny model can learn: the label is carried by its sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 4) + rng.sample(WORDS[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="session")
def sentiment_file():
    """write_sentiment_file(path, n, seed) -> rows: a JSONL sentiment set a tiny model can learn."""
    return write_sentiment_file
