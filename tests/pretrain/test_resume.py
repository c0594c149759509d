"""Exact resume with real processes: kill -9 mid-run then --resume gives the losses of an uninterrupted run,
bit for bit (CPU, deterministic mode); SIGTERM saves a checkpoint before exiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMAND = [sys.executable, "-m", "lmforge.commands.pretrain"]


def _losses(run: Path) -> dict[int, float]:
    """Train loss per step (a resumed run truncates what the killed one logged after its checkpoint)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.005)


def test_kill_9_then_resume_gives_identical_losses(tiny_flags, tmp_path):
    steps = ["--train.max_steps=60", "--train.save_every=10", "--train.eval_every=20"]
    straight = tiny_flags(train__name="straight") + steps
    subprocess.run(COMMAND + straight, check=True, capture_output=True, timeout=300)

    flags = tiny_flags(train__name="killed") + steps
    run = tmp_path / "runs" / "killed"
    process = subprocess.Popen(COMMAND + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "checkpoints" / "step_00000020" / "trainer_state.json").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    logged = _losses(run)
    assert max(logged) < 60, "the run finished before the kill; the test needs a slower run"

    resumed = subprocess.run(COMMAND + flags + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    expected, got = _losses(tmp_path / "runs" / "straight"), _losses(run)
    assert sorted(got) == list(range(1, 61))
    assert got == expected  # bit-identical floats


def test_sigterm_saves_a_checkpoint_before_exit(tiny_flags, tmp_path):
    flags = tiny_flags(train__name="term", train__max_steps=100000, train__save_every=0, train__eval_every=0)
    run = tmp_path / "runs" / "term"
    process = subprocess.Popen(COMMAND + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # 143: interrupted, not finished
    assert "SIGTERM at step" in stderr and "--resume" in stderr
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] >= 5
    assert (run / "checkpoints" / latest["path"] / "model.safetensors").is_file()
    assert not os.path.exists(run / "samples.txt")  # an interrupted run does not pretend to be finished
