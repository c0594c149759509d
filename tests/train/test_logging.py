import json
import math
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.eval import read_metrics
from lmforge.train.logging import MetricsLogger, TrainProgress, measure_peak_flops, mfu


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_are_flushed_per_event_and_survive_a_killed_process(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 3.0, "lr": torch.tensor(1e-3)})
        logger.log(1, {"loss": float("nan")}, split="val")
        seen = lines(tmp_path / "metrics.jsonl")  # readable while the logger is still open
    assert [(r["step"], r["split"], r["loss"]) for r in seen] == [(1, "train", 3.0), (1, "val", None)]
    assert seen[0]["lr"] == pytest.approx(1e-3)

    script = (
        "import os, sys\n"
        "from lmforge.train.logging import MetricsLogger\n"
        "logger = MetricsLogger(sys.argv[1], tensorboard=False)\n"
        "for step in range(1, 4):\n"
        "    logger.log(step, {'loss': 1.0 / step})\n"
        "os._exit(9)  # no close(), no interpreter shutdown: like SIGKILL\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], capture_output=True, timeout=120)
    assert run.returncode == 9, run.stderr.decode()
    assert [r["step"] for r in lines(tmp_path / "killed" / "metrics.jsonl")] == [1, 2, 3]


def test_resume_drops_entries_from_the_resumed_step_on(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(step, {"loss": 10.0 - step})
            if step % 5 == 0:
                logger.log(step, {"loss": 9.0}, split="val")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "split": "tr')  # a kill in the middle of a write
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # resumed from the checkpoint at step 6
        logger.log(7, {"loss": 0.5})
        logger.log(8, {"loss": 0.25})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train"), (5, "val"), (6, "train"),
        (7, "train"), (8, "train"),
    ]  # fmt: skip
    assert records[-1]["loss"] == 0.25


def test_tensorboard_events_are_readable_and_purged_on_resume(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": float(step)})
        logger.log(5, {"loss": 0.5}, split="val")
    time.sleep(0.01)
    with MetricsLogger(tmp_path) as logger:
        logger.log(4, {"loss": 40.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "val/loss"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_rejects_non_numeric_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger, pytest.raises(ValueError, match="not a number"):
        logger.log(1, {"loss": "low"})


def test_progress_bar_shows_loss_lr_speed_and_mfu():
    console = Console(record=True, force_terminal=True, width=160)
    progress = TrainProgress(total_steps=10, start_step=2, console=console)
    progress.update(3, loss=2.5, lr=3e-4, tokens_per_s=12345.0, mfu=0.123)
    progress.close()
    text = console.export_text()
    assert "3/10" in text and "loss 2.5000" in text and "lr 3.00e-04" in text
    assert "12,345 tok/s" in text and "MFU 12.3%" in text

    plain = Console(record=True, force_terminal=False, width=160)
    progress = TrainProgress(total_steps=10, console=plain, plain_interval_s=3600)
    for step in range(1, 11):
        progress.update(step, loss=1.0, lr=1e-3, tokens_per_s=100.0, mfu=None)
    progress.close()
    printed = plain.export_text().splitlines()
    assert len(printed) == 2 and printed[0].startswith("step 1/10") and printed[1].startswith("step 10/10")
    assert "MFU -" in printed[0] and "ETA" in printed[0]
    TrainProgress(10, enabled=False).update(1, 1.0, 1.0, 1.0, None)


def test_mfu_is_achieved_over_peak_flops():
    # 1000 tokens/s x 6e6 FLOPs/token = 6e9 FLOP/s achieved, over a 1e10 FLOP/s peak
    assert mfu(tokens_per_s=1000.0, flops_per_token=6_000_000, peak_flops=1e10) == pytest.approx(0.6)
    assert mfu(tokens_per_s=2000.0, flops_per_token=6_000_000, peak_flops=1e10) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1, 0.0)


def test_measured_peak_is_a_positive_finite_rate():
    peak = measure_peak_flops(size=64, seconds=0.05)
    assert isinstance(peak, float) and math.isfinite(peak) and peak > 0
