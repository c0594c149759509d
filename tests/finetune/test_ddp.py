"""Fine-tuning runs the pretraining loop, DDP included: two CPU processes (gloo) follow the trajectory of one
process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FINETUNE = ["-m", "lmforge.commands.finetune"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_two_processes_follow_the_single_process_trajectory(tmp_path, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 80, seed=0)
    common = [
        "--task=classification", "--model=bert-tiny", f"--data={tmp_path / 'train.jsonl'}", "--epochs=0",
        "--max-steps=8", "--eval-every=4", "--train.grad_accum=2", "--train.log_every=1", "--model.dropout=0",
        "--train.progress=false", "--train.tensorboard=false", "--model.vocab_size=200", f"--out={tmp_path}",
    ]  # fmt: skip
    single = [*common, "--train.name=single", "--train.batch_size=8"]
    done = subprocess.run([sys.executable, *FINETUNE, *single], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tokenizer = f"--model.tokenizer={tmp_path / 'single' / 'tokenizer'}"  # the same ids in both runs

    ddp = [*common, "--train.name=ddp", "--train.batch_size=4", tokenizer]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, *FINETUNE, *ddp], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = _records(tmp_path / "single"), _records(tmp_path / "ddp")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]  # rank 0 logs once
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["split"])
    assert (tmp_path / "ddp" / "model" / "task.json").is_file()
