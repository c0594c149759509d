"""`make demo` end to end, with a few steps: data, tokenizer, pretraining, samples, fine-tuning, the zoo."""

from __future__ import annotations

import io
import json

from rich.console import Console

from lmforge.demo import run_demo


def test_demo_runs_end_to_end(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=200)
    results = run_demo(
        steps=2, batch_size=2, seq_len=16, console=console, pretrain_steps=4, finetune_steps=4, out=str(tmp_path)
    )
    text = out.getvalue()
    run = tmp_path / "demo"
    for name in ("metrics.jsonl", "loss.png", "summary.md", "samples.txt", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    for step in ("1. data", "2. tokenizer", "3. pretraining", "4. samples", "5. fine-tuning", "6. the zoo"):
        assert step in text
    classifier = tmp_path / "demo-classifier"
    for name in ("report.md", "metrics.json", "roc_test.png", "confusion_test.png", "model/task.json"):
        assert (classifier / name).is_file(), name
    test = json.loads((classifier / "metrics.json").read_text())
    assert test["n_examples"] == 800 and 0.0 <= test["accuracy"] <= 1.0
    assert str(run / "loss.png") in text.replace("\n", "")
    assert "=== greedy ===" in text
    assert {r["preset"] for r in results} >= {"gpt-tiny", "bert-tiny", "t5-tiny"}
