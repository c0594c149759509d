"""DDP with two CPU processes (gloo): the same loss trajectory as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PRETRAIN = ["-m", "lmforge.commands.pretrain"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_two_processes_follow_the_single_process_trajectory(tiny_flags, tmp_path):
    common = ["--train.max_steps=12", "--train.eval_every=6", "--train.grad_accum=2"]
    single = tiny_flags(train__name="single", train__batch_size=4) + common
    subprocess.run([sys.executable, *PRETRAIN, *single], check=True, capture_output=True, timeout=300)

    ddp = tiny_flags(train__name="ddp", train__batch_size=2) + common
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, *PRETRAIN, *ddp], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr

    one, two = _records(tmp_path / "runs" / "single"), _records(tmp_path / "runs" / "ddp")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]  # rank 0 logs once
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["split"])
    assert json.loads((tmp_path / "runs" / "ddp" / "checkpoints" / "latest.json").read_text())["step"] == 12
