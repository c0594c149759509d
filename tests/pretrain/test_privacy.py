"""DP-SGD pretraining of a causal LM: the examples are fixed windows of the text, ε is logged and capped, a run
resumes exactly, and objectives without fixed examples are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lmforge import build_model
from lmforge.cli import main
from lmforge.data.pipeline.loaders import TokenStream
from lmforge.pretrain.data import Windows, stack_windows
from lmforge.train.privacy import register_grad_samplers

PRIVATE = ["--privacy.epsilon=8", "--privacy.delta=1e-5", "--privacy.accountant=rdp", "--optim.lr=3e-3"]


def _rows(run, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def test_windows_are_consecutive_non_overlapping_blocks_of_the_stream():
    stream = TokenStream([np.arange(10, dtype=np.int64), np.arange(100, 113, dtype=np.int64)])  # two shards
    windows = Windows(stream, 5)
    assert len(windows) == 23 // 5
    got = torch.cat([windows[i]["input_ids"] for i in range(len(windows))]).tolist()
    assert got == [*range(10), *range(100, 110)]  # across the shard boundary; the 3-token tail dropped
    batch = stack_windows([windows[1], windows[3]])
    assert batch["input_ids"].shape == (2, 5) and torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(IndexError):
        windows[4]


def test_gpt_without_a_mask_has_per_example_gradients():
    """Pretraining calls the model without an attention mask; its learned positions must still give one
    gradient per example (a position table broadcast over the batch sums the examples' gradients)."""
    from opacus import GradSampleModule

    register_grad_samplers()
    torch.manual_seed(0)
    model = build_model("gpt-tiny", n_layer=1, vocab_size=40, max_seq_len=8, dropout=0.0).train()
    ids = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    expected = []
    for b in range(3):
        model.zero_grad()
        model(input_ids=ids[b : b + 1], labels=ids[b : b + 1]).loss.backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    model(input_ids=ids, labels=ids).loss.backward()  # the mean over equal-length windows: Opacus's "mean"
    for name, p in model.named_parameters():
        for b in range(3):
            torch.testing.assert_close(p.grad_sample[b], expected[b][name], atol=1e-5, rtol=1e-4, msg=name)
    wrapped._close()


def test_private_pretraining_logs_epsilon_and_spends_the_budget(tiny_flags, tmp_path, capsys):
    flags = tiny_flags(train__name="private", train__max_steps=8, train__eval_every=4)
    assert main(["pretrain", *flags, *PRIVATE]) == 0
    err = capsys.readouterr().err
    assert "DP-SGD (Opacus): ε=8" in err and "windows of 32 tokens" in err
    run = tmp_path / "runs" / "private"
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    epsilons = [r["epsilon"] for r in rows]
    assert epsilons == sorted(epsilons) and 7.9 <= epsilons[-1] <= 8.0 * 1.01
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["epsilon_target"] == 8 and summary["steps"] == 8
    assert len(_rows(run, "val")) == 2 and all(np.isfinite(r["loss"]) for r in _rows(run, "val"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.name=bert", '--model.overrides={"n_layer": 1, "n_head": 2, "d_model": 32}'], "masked_lm"),
        (["--train.grad_accum=2"], "train.grad_accum > 1"),
        (["--optim.l1=1e-4"], "optim.l1"),
        (["--privacy.epsilon=0"], "privacy.epsilon=0.0 must be > 0"),
    ],
)
def test_private_pretraining_refuses_what_would_break_the_guarantee(tiny_flags, capsys, flags, message):
    assert main(["pretrain", *tiny_flags(train__name="refused"), *PRIVATE, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len(err[-1]) < 400


@pytest.mark.slow  # two private runs, each calibrating the noise
def test_a_private_pretraining_run_resumes_exactly(tiny_flags, tmp_path):
    """Cut after its step-4 checkpoint, a private run resumes to the uninterrupted run's losses and ε: the same
    Poisson draws (the sampler's position), noise (torch's RNG) and accountant history."""
    run = [*tiny_flags(train__max_steps=8, train__save_every=4, train__eval_every=0), *PRIVATE]
    assert main(["pretrain", *run, "--train.name=whole"]) == 0
    runs = tmp_path / "runs"
    shutil.copytree(runs / "whole", runs / "killed")
    shutil.rmtree(runs / "killed" / "checkpoints" / "step_00000008")
    assert main(["pretrain", *run, "--train.name=killed", "--resume"]) == 0
    whole, resumed = _rows(runs / "whole"), _rows(runs / "killed")
    assert [(r["step"], r["loss"], r["epsilon"]) for r in resumed] == [
        (r["step"], r["loss"], r["epsilon"]) for r in whole
    ]
