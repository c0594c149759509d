"""`lmforge data clean`: the cleaning pipeline."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds data clean (filled in by the issue that builds them)."""
