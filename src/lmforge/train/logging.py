"""What a run reports: a metrics file, TensorBoard events, a live progress bar, curves, a summary, MFU.

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
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

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


def read_metrics(path: Path) -> list[dict]:
    """The events of a metrics.jsonl, skipping lines that are not complete JSON objects (a kill mid-write)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the entries of `path` logged before `step` (and only complete lines), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] < step]
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


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
                           "MFU {task.fields[mfu]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )  # fmt: skip
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", lr="-", speed="-", mfu="-"
            )
            self._progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> None:
        """Show the state after update number `step` (1-based count of steps done)."""
        if not self.enabled:
            return
        fields = {
            "loss": f"{loss:.4f}",
            "lr": f"{lr:.2e}",
            "speed": f"{tokens_per_s:,.0f}",
            "mfu": "-" if mfu is None else f"{100 * mfu:.1f}%",
        }
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
                f"{fields['speed']} tok/s  MFU {fields['mfu']}  ETA {_duration(eta)}",
                highlight=False,
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- curves and summary


def plot_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """Loss vs step (train and val, from the entries that have "loss") and, when logged, lr vs step, as a
    PNG. Uses matplotlib's Agg canvas directly, so it works without a display and never changes pyplot's
    global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    if not metrics_jsonl.is_file():
        raise FileNotFoundError(f"{metrics_jsonl} not found; it is written by a training run (run_dir/{METRICS})")
    records = read_metrics(metrics_jsonl)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("loss") is not None:
            steps, losses = curves.setdefault(r.get("split", "train"), ([], []))
            steps.append(r["step"])
            losses.append(r["loss"])
    if not curves:
        raise ValueError(f"{metrics_jsonl} has no entries with a 'loss'; nothing to plot")
    lr_points = [(r["step"], r["lr"]) for r in records if r.get("split") == "train" and r.get("lr") is not None]

    fig = Figure(figsize=(8, 6 if lr_points else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if lr_points else 1, 1, sharex=True, squeeze=False)[:, 0]
    for split, (steps, losses) in sorted(curves.items(), key=lambda kv: kv[0] != "train"):
        axes[0].plot(steps, losses, label=split, marker="o" if len(steps) < 30 and split != "train" else None)
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    if lr_points:
        axes[1].plot(*zip(*lr_points, strict=True), color="tab:gray")
        axes[1].set_ylabel("learning rate")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp-{uuid.uuid4().hex[:8]}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out_png)


def write_summary(run_dir: Path, summary: dict) -> Path:
    """run_dir/summary.json (the dict as is) and summary.md (a two-column table); returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path = run_dir / "summary.json"
    try:
        text = json.dumps(summary, indent=2, allow_nan=False, default=str)
    except ValueError as error:
        raise ValueError(f"summary must hold finite numbers ({error}); replace NaN/inf with None") from None
    rows = "".join(f"| {key} | {_cell(value)} |\n" for key, value in summary.items())
    markdown = f"# Run summary\n\n| | |\n|---|---|\n{rows}"
    for path, content in ((json_path, text + "\n"), (run_dir / "summary.md", markdown)):
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    return json_path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value).replace("|", "\\|")
    return str(value).replace("|", "\\|")


# ---------------------------------------------------------------- throughput


def mfu(tokens_per_s: float, flops_per_token: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token / peak FLOP/s (1.0 = every FLOP the hardware can do)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 (measure it with measure_peak_flops)")
    return tokens_per_s * flops_per_token / peak_flops


def measure_peak_flops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0, device: str | torch.device = "cpu"
) -> float:
    """FLOP/s of back-to-back (size x size) @ (size x size) matmuls on `device` (2 size^3 FLOPs each),
    timed for about `seconds` after a warm-up: what this machine actually sustains, the denominator of MFU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b, out=out)  # warm-up: kernel selection, thread pool start
    sync()
    count, start = 0, time.perf_counter()
    batch = 1
    while True:
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        sync()
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        batch = min(batch * 2, 64)
    return 2 * size**3 * count / elapsed
