"""SPACE.yaml: the settings a study searches over, validated against a recipe's config schema.

    optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    train.batch_size: {type: categorical, choices: [8, 16, 32]}
    model.dropout: {type: float, low: 0.0, high: 0.3, step: 0.1}

Every key is a `section.field` of the recipe (`lmforge.train.config.Schema`); a wrong one names the closest keys
(difflib), as the recipe's own flags do. Each mistake is one line (ValueError) before any trial runs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.train.config import Schema, all_keys, load_yaml

TYPES = ("float", "int", "categorical")
FIELDS = {"type", "low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Param:
    """One searched setting: `key` (section.field), its distribution and bounds."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def grid_values(self) -> list:
        """The values a grid search visits: the choices, or low, low + step, ..., high (int steps default to 1)."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise ValueError(f"{self.key}: a grid search needs a step for a float range (or type: categorical)")
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.type == "int" else [round(v, 12) for v in values]


def parse_space(data: Any, schema: Schema, source: str = "SPACE.yaml") -> dict[str, Param]:
    """{key: Param} from a parsed SPACE.yaml mapping, each key checked against `schema`."""
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{source} is empty or not a mapping; write KEY: {{type: float|int|categorical, ...}}, "
            "e.g. optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
        )
    keys = all_keys(schema)
    params = {}
    for key, spec in data.items():
        key = str(key)
        if key not in keys:
            raise ValueError(f"{source}: {key!r} is not a key of the {schema.command} recipe{closest(key, keys)}")
        params[key] = parse_param(key, spec, source)
    return params


def closest(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else "; lmforge COMMAND --help lists the keys"


def parse_param(key: str, spec: Any, source: str) -> Param:
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: {key} must map to {{type: float|int|categorical, ...}}, not {spec!r}")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise ValueError(f"{source}: {key} has unknown field(s) {', '.join(map(str, unknown))}; use {sorted(FIELDS)}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ValueError(f"{source}: {key} has type {kind!r}; use one of {', '.join(TYPES)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{source}: {key} is categorical without choices; add choices: [A, B, ...]")
        return Param(key, kind, choices=tuple(choices))
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {key} needs a numeric {name} (got {value!r})")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ValueError(f"{source}: {key} is an int range, but low={low} or high={high} is not an integer")
    if low > high:
        raise ValueError(f"{source}: {key} has low={low} > high={high}; swap them")
    if not isinstance(log, bool):
        raise ValueError(f"{source}: {key} has log={log!r}; use true or false")
    if log and low <= 0:
        raise ValueError(f"{source}: {key} is log-scaled, so low must be > 0 (got low={low})")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ValueError(f"{source}: {key} has step={step!r}; use a positive number")
    if step is not None and log:
        raise ValueError(f"{source}: {key} sets both step and log, which Optuna does not combine; drop one")
    cast = int if kind == "int" else float
    return Param(key, kind, cast(low), cast(high), log, None if step is None else cast(step))


def load_space(path: str | Path, schema: Schema) -> dict[str, Param]:
    """SPACE.yaml at `path`, parsed and validated against `schema`."""
    return parse_space(load_yaml(path), schema, str(path))


def suggest(trial: Any, params: dict[str, Param]) -> dict[str, Any]:
    """One value per parameter from an Optuna trial (`trial.suggest_*`)."""
    values = {}
    for key, p in params.items():
        if p.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.type == "int":
            values[key] = trial.suggest_int(key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return values


def grid(params: dict[str, Param]) -> dict[str, list]:
    """The search space of Optuna's GridSampler."""
    return {key: p.grid_values() for key, p in params.items()}
