"""`lmforge data list` and `lmforge data get`: the dataset catalog."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds data list, data get (filled in by the issue that builds them)."""
