"""The evaluation progress bar: items done / total on a terminal, plain lines elsewhere, nothing when off."""

from __future__ import annotations

import io

from rich.console import Console

from lmforge.finetune.progress import EvalProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120), out


def test_plain_output_prints_the_count_at_intervals_and_at_the_end():
    console, out = _console(terminal=False)
    with EvalProgress("validation: generating", 5, console=console, plain_interval_s=3600) as bar:
        for _ in range(5):
            bar.advance(1)
    (line,) = out.getvalue().splitlines()  # the interval never passed: only the closing line
    assert line.startswith("validation: generating 5/5 examples")


def test_a_terminal_gets_a_live_bar_and_disabled_prints_nothing():
    console, out = _console(terminal=True)
    with EvalProgress("test: predicting", 64, unit="windows", console=console) as bar:
        bar.advance(64)
    assert "test: predicting" in out.getvalue() and "64/64" in out.getvalue() and "windows" in out.getvalue()

    console, out = _console(terminal=False)
    with EvalProgress("test: predicting", 64, console=console, enabled=False) as bar:
        bar.advance(64)
    assert out.getvalue() == ""
