"""`EvalProgress`: a progress bar for one pass of a final evaluation or a prediction over a set.

Generating 200 replies with a 135M-parameter model on CPU, or scoring thousands of QA windows, takes minutes
after the training bar has finished; without a bar the run looks hung. The bar counts items done / total
(examples, or QA windows) with elapsed time and ETA, on stderr, like the training bar
(`lmforge.train.logging.TrainProgress`): redrawn in place on a terminal, else one plain line every
`plain_interval_s` seconds and one at the end.
"""

from __future__ import annotations

import math
import time
from typing import Any


class EvalProgress:
    """Use as a context manager: `with EvalProgress("validation: generating", 200, "examples") as bar:
    ... bar.advance(32)`. enabled=False makes it a no-op."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "examples",
        enabled: bool = True,
        console: Any = None,
        plain_interval_s: float = 30.0,
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.enabled = enabled and total > 0
        self.console = console
        self.plain_interval_s = plain_interval_s
        self.done = 0
        self._progress: Any = None

    def __enter__(self) -> EvalProgress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = self.console or Console(stderr=True)
        self._start = self._last_plain = time.perf_counter()
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn(f"[bold]{self.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )  # fmt: skip
            self._task = self._progress.add_task(self.description, total=self.total)
            self._progress.start()
        return self

    def advance(self, n: int) -> None:
        """`n` more items done."""
        if not self.enabled:
            return
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self._last_plain >= self.plain_interval_s or self.done >= self.total:
            self._last_plain = now
            elapsed = now - self._start
            eta = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
            self.console.print(
                f"{self.description} {self.done}/{self.total} {self.unit}  {_duration(elapsed)} elapsed, "
                f"ETA {_duration(eta)}",
                highlight=False,
                markup=False,
            )

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _duration(seconds: float) -> str:
    seconds = int(seconds) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
