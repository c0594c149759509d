"""`lmforge data prepare` and `lmforge tokenizer train`."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds data prepare, tokenizer train (filled in by the issue that builds them)."""
