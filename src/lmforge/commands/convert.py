"""`lmforge convert` and `lmforge inspect`: checkpoints between formats."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds convert, inspect (filled in by the issue that builds them)."""
