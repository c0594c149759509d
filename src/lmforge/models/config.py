"""What every model config shares: JSON round trip, strict keys, and validation helpers.

A config is a plain dataclass of JSON types (int, float, str, bool, None, dict of those), so it can be
stored next to the weights and read back exactly. `to_dict()` adds the family name, which is how
`config_from_dict` knows which dataclass to build.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

HEADS = (
    "none",
    "causal_lm",
    "masked_lm",
    "seq2seq_lm",
    "sequence_classification",
    "token_classification",
    "question_answering",
)


@dataclasses.dataclass
class ModelConfig:
    """Fields every family has. `head` picks the task head; `attention` the attention implementation."""

    family: ClassVar[str] = ""
    allowed_heads: ClassVar[tuple[str, ...]] = HEADS

    head: str = "none"
    num_labels: int = 2
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        check_choice(self, "head", self.allowed_heads)
        check_choice(self, "attention", ("sdpa", "reference"))
        check_positive(self, "num_labels")
        self.validate()

    def validate(self) -> None:
        """Family-specific checks; raise ValueError naming the field and what is allowed."""

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        values = dict(values)
        family = values.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"config is for family {family!r}, not {cls.family!r}")
        check_known_keys(cls, values)
        return cls(**values)

    def replace(self, **changes: Any):
        check_known_keys(type(self), changes)
        return dataclasses.replace(self, **changes)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_known_keys(cls: type, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(field_names(cls)))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} for family {cls.family!r}; valid keys: {sorted(field_names(cls))}"
        )


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def check_fraction(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} must be a probability in [0, 1)")


def check_choice(cfg: Any, name: str, allowed: tuple | list) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed for family {cfg.family!r}; choose one of {list(allowed)}")


def check_heads(n_head: int, n_kv_heads: int | None, d_model: int, head_dim: int | None) -> None:
    """d_model must split evenly into heads (unless head_dim is given); n_head into kv-head groups."""
    if head_dim is None and d_model % n_head:
        options = [h for h in range(1, d_model + 1) if d_model % h == 0 and h <= 64]
        raise ValueError(f"n_head={n_head} does not divide d_model={d_model}; choose n_head in {options}")
    if n_kv_heads is not None and n_head % n_kv_heads:
        options = [h for h in range(1, n_head + 1) if n_head % h == 0]
        raise ValueError(
            f"n_kv_heads={n_kv_heads} must divide n_head={n_head} (grouped-query attention); choose one of {options}"
        )
