"""Helpers every family mapping uses."""

from __future__ import annotations


def check_names(given: set[str], expected: set[str]) -> None:
    """Refuse a state dict whose tensor names differ from the config's, naming every difference."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {missing}, unexpected {unexpected}")
