"""The knobs a tuner searches over: train.max_micro_batch keeps the large batch's updates within a smaller
memory, and task.label_smoothing changes the training loss only (validation losses stay comparable)."""

from __future__ import annotations

import json

import pytest

from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

RUN = "bert-tiny-train-classification"


def run(out, data, *flags: str) -> tuple[list[float], float]:
    base = [
        "--train.progress=false",
        "--train.tensorboard=false",
        "--task=classification",
        "--model=bert-tiny",
        f"--data={data}",
        "--model.vocab_size=200",
        "--model.dropout=0",
        "--train.deterministic=true",
        "--train.log_every=1",
        "--eval-every=0",
        "--max-steps=4",
        "--optim.lr=3e-3",
        f"--out={out}",
    ]
    summary = finetune(parse_args([*base, *flags], FINETUNE))
    lines = (out / RUN / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"], summary["validation"]["loss"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, sentiment_file):
    tmp = tmp_path_factory.mktemp("knobs")
    sentiment_file(tmp / "train.jsonl", 120, seed=0)
    return tmp / "train.jsonl"


def test_max_micro_batch_gives_the_large_batch_updates(tmp_path, data):
    whole, whole_val = run(tmp_path / "whole", data, "--train.batch_size=16")
    tokenizer = f"--model.tokenizer={tmp_path / 'whole' / RUN / 'tokenizer'}"  # the same ids
    split, split_val = run(tmp_path / "split", data, tokenizer, "--train.batch_size=16", "--train.max_micro_batch=4")
    config = json.loads((tmp_path / "split" / RUN / "model" / "task.json").read_text(encoding="utf-8"))["config"]
    assert (config["train"]["batch_size"], config["train"]["grad_accum"]) == (4, 4)
    assert split == pytest.approx(whole, rel=1e-5) and split_val == pytest.approx(whole_val, rel=1e-5)


def test_a_batch_size_the_micro_batch_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="batch_size=10 is not a multiple of train.max_micro_batch=4"):
        parse_args(["--train.batch_size=10", "--train.max_micro_batch=4"], FINETUNE)


def test_label_smoothing_changes_the_training_loss_only(tmp_path, data):
    plain, plain_val = run(tmp_path / "plain", data, "--optim.lr=1e-12")  # weights stay as initialised
    tokenizer = f"--model.tokenizer={tmp_path / 'plain' / RUN / 'tokenizer'}"
    smoothed, smoothed_val = run(tmp_path / "smooth", data, tokenizer, "--optim.lr=1e-12", "--task.label_smoothing=0.3")
    assert all(abs(a - b) > 1e-6 for a, b in zip(plain, smoothed, strict=True))
    assert smoothed_val == pytest.approx(plain_val, rel=1e-6)
