"""`build_model`: from a preset name, a family name or a config object to a model with fresh weights."""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.models.bert import Bert, BertConfig, RobertaConfig
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama, LlamaConfig
from lmforge.models.presets import PRESETS
from lmforge.models.t5 import T5, T5Config
from lmforge.models.transformer import Transformer, TransformerConfig

FAMILIES: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "llama": (LlamaConfig, Llama),
    "bert": (BertConfig, Bert),
    "roberta": (RobertaConfig, Bert),
    "t5": (T5Config, T5),
    "transformer": (TransformerConfig, Transformer),
}


def build_config(name_or_family: str, **overrides: Any) -> ModelConfig:
    """Config of a preset (e.g. "gpt2", "llama-tiny") or a family ("gpt", ...) with fields overridden."""
    if name_or_family in PRESETS:
        family, fields = PRESETS[name_or_family]
        values = {**fields, **overrides}
    elif name_or_family in FAMILIES:
        family, values = name_or_family, dict(overrides)
    else:
        raise ValueError(f"unknown model {name_or_family!r}; presets: {sorted(PRESETS)}; families: {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(values)


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Inverse of `config.to_dict()`: the "family" key says which config class to build."""
    family = values.get("family")
    if family not in FAMILIES:
        raise ValueError(f"config family {family!r} is unknown; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_dict(values)


def build_model(name_or_config: str | ModelConfig, **overrides: Any) -> nn.Module:
    """A model with freshly initialised weights.

    >>> model = build_model("gpt-tiny")                      # a preset
    >>> model = build_model("llama", n_layer=2, d_model=64)  # a family with its defaults, overridden
    >>> model = build_model("bert-base", head="sequence_classification", num_labels=3)
    """
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config.replace(**overrides) if overrides else name_or_config
    else:
        config = build_config(name_or_config, **overrides)
    return FAMILIES[config.family][1](config)
