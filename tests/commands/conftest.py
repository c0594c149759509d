"""A tiny fine-tuned classifier run shared by the prune and distill command tests (trained once per session)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

SENTIMENT = {"positive": ["good", "great", "superb", "lovely"], "negative": ["bad", "awful", "dull", "poor"]}
FILLER = ["the", "film", "was", "a", "story", "with", "actors", "and", "plot", "this"]


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(80):
        label = ["positive", "negative"][i % 2]
        words = rng.sample(FILLER, 4) + rng.sample(SENTIMENT[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path = tmp_path_factory.mktemp("sentiment") / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, sentiment_data) -> Path:
    """bert-tiny (2 layers) fine-tuned for classification for a few steps: its run folder."""
    import torch

    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.train.config import parse_args

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread beats several on a shared machine
    out = tmp_path_factory.mktemp("classifier")
    flags = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0", "--out", str(out)]
    flags += ["--task=classification", "--model=bert-tiny", f"--data={sentiment_data}", "--max-steps=4"]
    flags += ["--model.vocab_size=60", "--train.batch_size=16", "--optim.lr=3e-3"]
    try:
        return Path(finetune(parse_args(flags, FINETUNE))["run_dir"])
    finally:
        torch.set_num_threads(threads)
