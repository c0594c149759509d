"""Helpers shared by the command modules."""

from __future__ import annotations

import json


def parse_overrides(pairs: list[str]) -> dict:
    """["n_layer=2", "tie_embeddings=false"] -> {"n_layer": 2, "tie_embeddings": False}; values are JSON
    when they parse as JSON (numbers, true/false/null, dicts), else strings."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} must look like key=value, e.g. n_layer=2")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
