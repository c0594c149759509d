import json
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmforge.train.logging import (
    MetricsLogger,
    TrainProgress,
    measure_peak_flops,
    mfu,
    plot_curves,
    read_metrics,
    write_summary,
)


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


def test_plot_curves_writes_a_png_with_train_and_val(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 21):
            logger.log(step, {"loss": 5.0 / step, "lr": 1e-3})
            if step % 10 == 0:
                logger.log(step, {"loss": 6.0 / step}, split="val")
    out = tmp_path / "plots" / "loss.png"
    plot_curves(tmp_path / "metrics.jsonl", out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot_curves(tmp_path / "missing" / "metrics.jsonl", out)
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "split": "train", "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no entries with a 'loss'"):
        plot_curves(tmp_path / "empty.jsonl", out)


def test_write_summary_json_and_markdown(tmp_path):
    path = write_summary(tmp_path, {"final_val_loss": 2.345678912, "steps": 100, "model": "gpt-tiny"})
    assert json.loads(path.read_text()) == {"final_val_loss": 2.345678912, "steps": 100, "model": "gpt-tiny"}
    markdown = (tmp_path / "summary.md").read_text()
    assert "| final_val_loss | 2.34568 |" in markdown and "| model | gpt-tiny |" in markdown


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


def test_mfu_and_measured_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=6_000_000, peak_flops=1e10) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1, 0.0)
    peak = measure_peak_flops(size=256, seconds=0.2)
    # the same matmul timed independently achieves a comparable rate (the loop measures what it claims)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        a @ b
        n += 1
    independent = 2 * 256**3 * n / (time.perf_counter() - start)
    assert 0.2 < peak / independent < 5.0
