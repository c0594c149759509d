"""`build_model`: from a preset name, a family name or a config object to a model with fresh weights.

Every model is built here (or by `meta_model`, which allocates nothing), so two guards live here too:
- `check_types`: each config value must have its field's JSON type (a null where an integer goes would
  otherwise surface as a TypeError deep inside a model's arithmetic);
- `check_memory`: the weights must fit in the memory left on the device they are built on. Their size is
  computed, not allocated: every layer of a family holds the same tensors (T5's first layer adds a small
  relative-position table, which a one-layer model already counts), so any count c is affine in each layer
  count n, c(n) = c(1) + (n - 1)(c(2) - c(1)), and two weightless one- and two-layer instances give it for any
  n, even 10^9, in milliseconds (`measure_by_layers`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.models.bert import Bert, BertConfig, RobertaConfig
from lmforge.models.config import ModelConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama, LlamaConfig
from lmforge.models.lstm import GRUConfig, LSTMConfig, RNNClassifier
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
    "lstm": (LSTMConfig, RNNClassifier),
    "gru": (GRUConfig, RNNClassifier),
}


# Hugging Face model_type -> our family, where the names differ (Mistral and Qwen2/3 are Llama-shaped)
HF_MODEL_TYPES = {"gpt2": "gpt", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}


def family_of(name: str) -> str:
    """The family of a preset ("gpt-tiny" -> "gpt"), a family name, or a saved model folder (lmforge's format
    nests the config under "model"; a Hugging Face config.json names its model_type), or a GGUF file (we
    read the llama architecture only). Other names come back as given, so the caller's error can name them."""
    if name in PRESETS:
        return PRESETS[name][0]
    if name.endswith(".gguf"):
        return "llama"
    config_file = Path(name) / "config.json"
    if config_file.is_file():
        values = json.loads(config_file.read_text(encoding="utf-8"))
        nested = values.get("model") if isinstance(values.get("model"), dict) else {}
        family = values.get("family") or nested.get("family")
        model_type = values.get("model_type", "")
        return family or HF_MODEL_TYPES.get(model_type, model_type)
    return name


def build_config(name_or_family: str, **overrides: Any) -> ModelConfig:
    """Config of a preset (e.g. "gpt2", "llama-tiny") or a family ("gpt", ...) with fields overridden."""
    if name_or_family in PRESETS:
        family, fields = PRESETS[name_or_family]
        values = {**fields, **overrides}
    elif name_or_family in FAMILIES:
        family, values = name_or_family, dict(overrides)
    else:
        raise ValueError(f"unknown model {name_or_family!r}; presets: {sorted(PRESETS)}; families: {sorted(FAMILIES)}")
    check_types(FAMILIES[family][0], values)
    return FAMILIES[family][0].from_dict(values)


def config_from_dict(values: dict[str, Any], where: str = "") -> ModelConfig:
    """Inverse of `config.to_dict()`: the "family" key says which config class to build. `where` prefixes the
    field names in errors (e.g. "model." for the config nested in an lmforge folder's config.json)."""
    family = values.get("family")
    if family not in FAMILIES:
        raise ValueError(f"config family {family!r} is unknown; expected one of {sorted(FAMILIES)}")
    check_types(FAMILIES[family][0], values, where)
    return FAMILIES[family][0].from_dict(values)


def build_model(name_or_config: str | ModelConfig, **overrides: Any) -> nn.Module:
    """A model with freshly initialised weights, refused (`check_memory`) when they cannot fit in memory.

    >>> model = build_model("gpt-tiny")                      # a preset
    >>> model = build_model("llama", n_layer=2, n_head=4, d_model=64)  # a family with its defaults, overridden
    >>> model = build_model("bert-base", head="sequence_classification", num_labels=3)
    """
    if isinstance(name_or_config, ModelConfig):
        check_types(type(name_or_config), overrides)
        config = name_or_config.replace(**overrides) if overrides else name_or_config
    else:
        config = build_config(name_or_config, **overrides)
    check_memory(config, torch.get_default_dtype(), torch.get_default_device())
    return FAMILIES[config.family][1](config)


# ------------------------------------------------------------------------------------------ value types

JSON_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def check_types(config_class: type[ModelConfig], values: dict[str, Any], where: str = "") -> None:
    """Refuse a value of `values` whose JSON type is not its field's (an int is a float too; a bool is not an
    int), naming it, e.g. "d_model is null; expected an integer". Unknown keys are left to the config."""
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and typing.get_origin(hint) is not typing.ClassVar:
            allowed = tuple(typing.get_origin(t) or t for t in typing.get_args(hint) or (hint,))  # int | None -> both
            check_value_type(f"{where}{name}", value, allowed)


def check_value_type(name: str, value: Any, allowed: tuple[type, ...]) -> None:
    """Raise ValueError unless `value` is one of the JSON types `allowed` (int, float, bool, str, dict, NoneType)."""
    if value is None:
        fits = type(None) in allowed
    elif isinstance(value, bool):
        fits = bool in allowed
    elif isinstance(value, int):
        fits = int in allowed or float in allowed
    else:
        fits = isinstance(value, tuple(t for t in allowed if t in (float, str, dict)))
    if not fits:
        expected = " or ".join(JSON_NAMES[t] for t in allowed if t in JSON_NAMES)
        expected += " or null" if type(None) in allowed else ""
        raise ValueError(f"{name} is {describe_value(value)}; expected {expected}")


def describe_value(value: Any) -> str:
    """A JSON value in words: null, true, the number 2.5, the string "2", a list, an object."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {json.dumps(value)[:40]}"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, (list, tuple)) else type(value).__name__


# ------------------------------------------------------------------------------------------ size and memory

LAYER_FIELDS = ("n_layer", "n_decoder_layer")  # layer counts: a None n_decoder_layer follows n_layer
SIZE_FIELDS = (
    "n_layer",
    "n_decoder_layer",
    "d_model",
    "d_ff",
    "hidden_size",
    "head_dim",
    "vocab_size",
    "tgt_vocab_size",
    "max_seq_len",
)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Makes torch.nn.init's initialisers no-ops, so building a model only allocates its tensors.

    Loading replaces every tensor anyway; drawing ~10^8 random numbers first would cost more than reading
    them from disk. Allocation is free until memory is touched, and assigned tensors replace these untouched.
    (It patches module attributes, so another thread building a model meanwhile would skip its init too.)
    """
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def meta_model(config: ModelConfig) -> nn.Module:
    """The model with shapes only (meta tensors): for checking names and shapes without memory. It builds every
    layer as a Python object, so check the config's size first (`check_memory`)."""
    with torch.device("meta"), no_init():
        return FAMILIES[config.family][1](config)


def measure_by_layers(config: ModelConfig, measure: Callable[[nn.Module], tuple[int, ...]]) -> tuple[int, ...]:
    """`measure(model)` of the whole model, from weightless instances with one and two layers (see the module
    docstring): c = c_1 + sum over layer counts n_f of (n_f - 1)(c_{f=2} - c_1)."""
    layers = {f: getattr(config, f) for f in LAYER_FIELDS if isinstance(getattr(config, f, None), int)}
    one = config.replace(**{f: 1 for f in layers})
    base = measure(meta_model(one))
    total = list(base)
    for field, n in layers.items():
        step = measure(meta_model(one.replace(**{field: 2})))
        total = [t + (n - 1) * (s - b) for t, s, b in zip(total, step, base, strict=True)]
    return tuple(total)


def parameter_memory(config: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(distinct parameters, bytes of parameters and buffers in `dtype`) of the model `config` describes."""

    def measure(model: nn.Module) -> tuple[int, int]:
        parameters = sum(p.numel() for p in model.parameters())
        return parameters, parameters + sum(b.numel() for b in model.buffers())

    parameters, elements = measure_by_layers(config, measure)
    return parameters, elements * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: CUDA's free memory; on the CPU, the kernel's MemAvailable
    (or free pages) capped by a cgroup v2 memory limit (a container's); None where unknown (meta, MPS, ...)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    if free is None:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((cgroup / "memory.current").read_text())
            free = left if free is None else min(free, left)
    return free


def check_memory(config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu", source: str = "") -> None:
    """Refuse `config` when its weights in `dtype` need more than the memory left on `device`, naming the size
    that makes it so (the one furthest above its family's default) and the bytes it would take; `source`
    (a file) starts the message. Costs two weightless builds of a one- and a two-layer model."""
    available = available_memory(torch.device(device))
    if available is None:
        return
    parameters, needed = parameter_memory(config, dtype)
    if needed <= available:
        return
    defaults = type(config)()
    ratios = {
        f: getattr(config, f) / getattr(defaults, f)
        for f in SIZE_FIELDS
        if isinstance(getattr(config, f, None), int) and isinstance(getattr(defaults, f, None), int)
    }
    culprit = max(ratios, key=ratios.get, default=None)
    if culprit is not None and ratios[culprit] > 1:
        sizes, fix = (
            f"{culprit}={getattr(config, culprit)} (the default is {getattr(defaults, culprit)})",
            f"lower {culprit}",
        )
    else:
        sizes = ", ".join(f"{f}={getattr(config, f)}" for f in SIZE_FIELDS if getattr(config, f, None) is not None)
        fix = "choose a smaller model or free some memory"
    dtype_name = str(dtype).removeprefix("torch.")
    raise ValueError(
        f"{source}{config.family} config with {sizes} has {parameters:,} parameters, {human_bytes(needed)} of "
        f"{dtype_name} weights, more than the {human_bytes(available)} of memory available; {fix}"
    )


def human_bytes(n: int) -> str:
    """1048576 -> "1.0 MB" (decimal units, as disks and `free --si` count)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    power = min(int(math.log10(max(n, 1)) // 3), len(units) - 1)
    return f"{n / 1000**power:.1f} {units[power]}"
