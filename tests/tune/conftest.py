"""Shared fixtures of the tuning tests: a sentiment set a tiny classifier learns in seconds, a small text corpus,
and the base flags of seconds-long fine-tuning and pretraining runs."""

from __future__ import annotations

import json
import random

import pytest

WORDS = {"positive": ["good", "great", "superb", "lovely"], "negative": ["bad", "awful", "dull", "poor"]}
FILLER = ["the", "film", "was", "a", "story", "with", "actors", "and", "plot", "this"]


@pytest.fixture(scope="session")
def sentiment_path(tmp_path_factory):
    """A JSONL sentiment set whose label is carried by its sentiment words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("tune-data") / "train.jsonl"
    rows = []
    for i in range(96):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 3) + rng.sample(WORDS[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def finetune_flags(sentiment_path) -> list[str]:
    """A deterministic bert-tiny classification run of a few steps on CPU."""
    return [
        "--task=classification",
        "--model=bert-tiny",
        f"--data={sentiment_path}",
        "--model.vocab_size=120",
        "--epochs=0",
        "--max-steps=6",
        "--train.batch_size=16",
        "--train.eval_every=3",
        "--train.device=cpu",
        "--train.deterministic=true",
        "--train.threads=1",
        "--train.tensorboard=false",
        "--optim.lr=3e-3",
    ]


@pytest.fixture(scope="session")
def pretrain_flags(tmp_path_factory) -> list[str]:
    """A deterministic 1-layer, 32-wide GPT on a few thousand characters, 12 steps, evaluated every 2."""
    from lmforge.data import load_dataset

    path = tmp_path_factory.mktemp("tune-corpus") / "tiny.txt"
    path.write_text(load_dataset("shakespeare-small", "train")[0][:20_000], encoding="utf-8")
    return [
        "--model.name=gpt",
        '--model.overrides={"n_layer": 1, "n_head": 2, "d_model": 32}',
        f"--data.dataset={path}",
        "--data.block_size=32",
        "--train.batch_size=4",
        "--train.max_steps=12",
        "--train.eval_every=2",
        "--train.eval_batches=2",
        "--train.save_every=0",
        "--train.log_every=1",
        "--train.deterministic=true",
        "--train.threads=1",
        "--train.device=cpu",
        "--train.tensorboard=false",
        "--train.sample_tokens=0",
        "--optim.warmup_steps=2",
        "--optim.lr=0.01",
    ]
