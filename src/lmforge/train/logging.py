"""What a run reports while it trains: a metrics file, TensorBoard events, a live progress bar, MFU. Its curves
and its report are drawn from the metrics file afterwards by `lmforge.eval` (plot_training_curves, write_report).

metrics.jsonl holds one JSON object per line, {"step", "split", "time", <metric>: value, ...}, written
and flushed as each event happens, so a killed run keeps everything it logged. Non-finite values (a NaN
loss) are written as null, keeping every line valid JSON.

Resuming: the first `log` call of a MetricsLogger at step s drops every existing entry with step >= s
(the file is rewritten atomically) and TensorBoard purges its events from step s on, so a run resumed
from an earlier checkpoint has one curve without duplicates. A partial last line (a kill mid-write) is
dropped at the same time.

MFU (model FLOPs utilisation, PaLM, Chowdhery et al., 2022) = achieved FLOP/s / peak FLOP/s, where
achieved = tokens/s x FLOPs per token (6N + attention, `lmforge.models.flops_per_token`) and the peak is
measured here by timing large matmuls (`measure_peak_flops`), not taken from a data sheet.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.eval.plots import read_metrics
from lmforge.io import write_text_atomic

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsLogger:
    """Appends events to run_dir/metrics.jsonl and (tensorboard=True) to TensorBoard event files in
    run_dir/tensorboard. enabled=False (every rank but the first) makes every call a no-op."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.enabled = enabled
        self.tensorboard = tensorboard and enabled
        self._file = None
        self._writer = None
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (fail now, not at step 1)
            except ImportError:
                raise RuntimeError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard, "
                    "or turn TensorBoard logging off"
                ) from None

    def log(self, step: int, values: dict[str, float], split: str = "train") -> None:
        """Record `values` (names -> numbers, tensors allowed) for `split` ("train", "val", ...) at `step`."""
        if not self.enabled:
            return
        if self._file is None:
            self._open(step)
        numbers = {name: _number(value) for name, value in values.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **numbers}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in numbers.items():
                if value is not None:
                    self._writer.add_scalar(f"{split}/{name}", value, int(step))

    def _open(self, first_step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, first_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at steps >= first_step left by the run this one resumes
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD), purge_step=int(first_step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _number(value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"metric value {value!r} is not a number; log floats, ints or 0-d tensors")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the entries of `path` logged before `step` (and only complete lines), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] < step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------- progress bar


class TrainProgress:
    """A rich live bar: step/total, loss, lr, tokens/s, MFU, elapsed and ETA. On a terminal it redraws in
    place; when the output is not a terminal (a log file, CI) it prints one plain line every
    `plain_interval_s` seconds instead; enabled=False prints nothing."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        console: Any = None,
        plain_interval_s: float = 30.0,
    ) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self.plain_interval_s = plain_interval_s
        self._last_plain = -math.inf
        self._progress = None
        self._extra = ""
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self._start = time.perf_counter()
        self._start_step = start_step
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s  "
                           "MFU {task.fields[mfu]}{task.fields[extra]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )  # fmt: skip
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", lr="-", speed="-", mfu="-", extra=""
            )
            self._progress.start()

    @property
    def live(self) -> bool:
        """Whether the bar redraws every step (a terminal), so extra fields are worth computing every step."""
        return self._progress is not None

    def update(
        self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None, extra: dict | None = None
    ) -> None:
        """Show the state after update number `step` (1-based count of steps done); `extra` adds named numbers
        (a private run's ε)."""
        if not self.enabled:
            return
        fields = {
            "loss": f"{loss:.4f}",
            "lr": f"{lr:.2e}",
            "speed": f"{tokens_per_s:,.0f}",
            "mfu": "-" if mfu is None else f"{100 * mfu:.1f}%",
            "extra": "".join(f"  {k} {v:.3g}" for k, v in (extra or {}).items()) or self._extra,
        }
        self._extra = fields["extra"]  # shown until the next values (they are computed at logging steps only)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, **fields)
            return
        now = time.perf_counter()
        if now - self._last_plain >= self.plain_interval_s or step >= self.total_steps:
            self._last_plain = now
            done = max(step - self._start_step, 1)
            eta = (now - self._start) / done * max(self.total_steps - step, 0)
            self.console.print(
                f"step {step}/{self.total_steps}  loss {fields['loss']}  lr {fields['lr']}  "
                f"{fields['speed']} tok/s  MFU {fields['mfu']}{fields['extra']}  ETA {_duration(eta)}",
                highlight=False,
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- throughput


def mfu(tokens_per_s: float, flops_per_token: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token / peak FLOP/s (1.0 = every FLOP the hardware can do)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 (measure it with measure_peak_flops)")
    return tokens_per_s * flops_per_token / peak_flops


def measure_peak_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0, device: str | torch.device = "cpu"
) -> float:
    """FLOP/s of back-to-back (size x size) @ (size x size) matmuls on `device` (2 size^3 FLOPs each): what this
    machine sustains, the denominator of MFU.

    The budget is split into short bursts and the fastest burst counts: on a shared machine other processes
    steal time from some bursts, and an average would then understate the peak (and MFU would read above
    100%). The fastest burst is the best estimate of what the hardware does when it is ours."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b, out=out)  # warm-up: kernel selection, thread pool start
    sync()
    best, deadline, batch = 0.0, time.perf_counter() + seconds, 1
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 * batch / elapsed)
        if elapsed < seconds / 16:  # grow bursts until each is long enough to time well
            batch = min(batch * 2, 64)
    return best
