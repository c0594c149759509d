"""Shared fixtures for the pretraining tests: a small text corpus and the flags of a seconds-long run."""

from __future__ import annotations

import functools

import pytest

from lmforge.data import load_dataset


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """The first 40,000 characters of shakespeare-small as a text file (the last 10% becomes validation)."""
    text = load_dataset("shakespeare-small", "train")[0][:40_000]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def run_flags(tiny_corpus):
    """flags(out, **changes): the flags of a deterministic CPU run of a 1-layer, 32-wide GPT on the tiny corpus
    with its run folders under `out`, about a second per 20 steps; changes as train__batch_size=2."""
    return functools.partial(_run_flags, tiny_corpus)


def _run_flags(corpus, out, **changes) -> list[str]:
    values = {
        "model.name": "gpt",
        "model.overrides": '{"n_layer": 1, "n_head": 2, "d_model": 32}',
        "data.dataset": str(corpus),
        "data.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 20,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.save_every": 10,
        "train.log_every": 1,
        "train.out": str(out),
        "train.name": "tiny",
        "train.deterministic": True,
        "train.threads": 1,
        "train.device": "cpu",
        "train.progress": False,
        "train.tensorboard": False,
        "train.sample_tokens": 0,
        "optim.warmup_steps": 2,
        "optim.lr": 0.01,
    }
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_flags(run_flags, tmp_path):
    """`run_flags` with the run folders under tmp_path/runs."""
    return functools.partial(run_flags, tmp_path / "runs")
