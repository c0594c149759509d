"""Typed run configs: one source for YAML files, command-line flags and `--help`, shared by every recipe.

A recipe's config is a dataclass with one field per section (`Schema`); each section is a dataclass whose
fields carry their help text in `metadata["help"]` (`opt`). The same dataclasses validate a YAML recipe,
parse `--section.key=value` flags (the value parsed by the field's type) and print `--help`. Precedence:
dataclass defaults < `--config FILE.yaml` < flags.

    lmforge pretrain --config configs/shakespeare-char.yaml --train.batch_size=32 --max-steps 500

Stable short flags (`Schema.aliases`) map to fields, e.g. `--model`, `--data`, `--out`, `--max-steps`. An
unknown key or a bad value fails before anything is built, naming the key and the closest valid ones
(difflib). `TrainSection` (the loop's settings) is shared by every recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


DTYPES = ("float32", "bfloat16", "float16")
NAN_POLICIES = ("stop", "skip")


@dataclass
class TrainSection:
    max_steps: int = opt(1000, "optimizer steps")
    batch_size: int = opt(16, "sequences per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_micro_batch: int = opt(
        0,
        "largest micro-batch that fits in memory: a larger batch_size becomes micro-batches of this size and "
        "grad_accum grows to match, so each optimizer step sees the same examples (0: off)",
    )
    eval_every: int = opt(200, "evaluate every N steps (0: only at the end)")
    eval_batches: int = opt(10, "validation batches per evaluation")
    save_every: int = opt(500, "checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(3, "checkpoints kept besides the best")
    seed: int = opt(1337, "seed of weights, data order and dropout")
    deterministic: bool = opt(False, "deterministic kernels (bit-identical reruns, slower on GPU)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = opt("float32", "float32 | bfloat16 (autocast) | float16 (autocast + GradScaler, CUDA only)")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass")
    parallel: str = opt(
        "ddp",
        "ddp | fsdp (FSDP2) | hsdp (FSDP within groups, replicas across) | tp (tensor parallel) | fsdp+tp (2-D "
        "mesh) across torchrun's processes; the sharded modes save sharded checkpoints (`lmforge.train.parallel`)",
    )
    tp: int = opt(1, "tensor-parallel degree (train.parallel=tp or fsdp+tp)")
    dp_shard: int = opt(0, "train.parallel=hsdp: processes per shard group (0: torchrun's processes per node)")
    cpu_offload: bool = opt(False, "keep FSDP's parameter shards, gradients and optimizer state in host memory")
    early_stopping_patience: int = opt(0, "stop after N evaluations without a better val loss (0: off)")
    nan_policy: str = opt("stop", "stop | skip: what a NaN/inf loss does")
    out: str = opt("runs", "folder holding the run folders")
    name: str = opt("", "run name, a folder under train.out (default: <model>-<dataset>)")
    resume: bool = opt(False, "continue from the run's latest checkpoint")
    threads: int = opt(0, "CPU threads (0: torch's default)")
    reuse_freed_memory: bool = opt(
        True,
        "CPU on Linux: keep freed memory in the process heap for the next step instead of mapping it afresh "
        "(no page faults on every step's large tensors; the resident size stays at the step's peak)",
    )
    sample_tokens: int = opt(300, "tokens per sample written to samples.txt at the end (0: none)")
    sample_prompt: str = opt("\n", "prompt the samples start from")
    log_every: int = opt(10, "write train metrics every N steps")
    tensorboard: bool = opt(True, "write TensorBoard event files")
    progress: bool = opt(True, "live progress bar")

    def split_micro_batches(self) -> None:
        """batch_size > max_micro_batch: run it as batch_size / max_micro_batch micro-batches of max_micro_batch
        with that many times more accumulation. The loop averages the loss over all units of a step
        (`lmforge.train.loop`), so the update is the large batch's (up to float rounding, and dropout's random
        draws); a tuned batch size thus never needs more memory than max_micro_batch rows. Idempotent: a saved
        config already split stays as it is."""
        if self.max_micro_batch < 0:
            raise ValueError(f"train.max_micro_batch={self.max_micro_batch} must be >= 0 (0: off)")
        if not self.max_micro_batch or self.batch_size <= self.max_micro_batch:
            return
        if self.batch_size % self.max_micro_batch:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not a multiple of train.max_micro_batch="
                f"{self.max_micro_batch}; choose sizes that divide"
            )
        factor = self.batch_size // self.max_micro_batch
        self.batch_size, self.grad_accum = self.max_micro_batch, self.grad_accum * factor

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        self.split_micro_batches()
        for name in (
            "max_micro_batch",
            "eval_every",
            "save_every",
            "keep_last",
            "early_stopping_patience",
            "threads",
            "sample_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"train.nan_policy={self.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
        if self.name and (self.name in (".", "..") or any(sep in self.name for sep in ("/", "\\", "\0"))):
            raise ValueError(
                f"train.name={self.name!r} must be a plain folder name (no '/', '..'): the run folder is "
                "train.out/train.name; put the path in train.out instead"
            )


@dataclass
class PrivacySection:
    """DP-SGD through Opacus (`lmforge.train.privacy`): off unless privacy.epsilon is set. Shared by the recipes
    that can train privately (fine-tuning; causal-LM pretraining)."""

    epsilon: float | None = opt(None, "DP-SGD privacy budget ε (e.g. 8; smaller is more private); unset: no DP")
    delta: float = opt(1e-5, "DP-SGD δ, below 1/N for N training examples")
    max_grad_norm: float = opt(1.0, "DP-SGD per-example gradient clipping norm C")
    accountant: str = opt("prv", "privacy accountant: prv (Gopi et al., 2021) | rdp (Mironov, 2017)")

    def __post_init__(self) -> None:
        if self.epsilon is not None and self.epsilon <= 0:
            raise ValueError(f"privacy.epsilon={self.epsilon} must be > 0 (e.g. 8; smaller is more private)")
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm={self.max_grad_norm} must be > 0 (e.g. 1.0)")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta} must be in (0, 1/N) for N training examples, e.g. 1e-5")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"privacy.accountant={self.accountant!r} is not one of prv, rdp")


@dataclass(frozen=True)
class Schema:
    """A command's config: the root dataclass (one field per section), the section classes, the short flags.
    Pretraining and fine-tuning share the parser, validation and --help through it."""

    root: type
    sections: dict[str, type]
    aliases: dict[str, str]
    command: str
    summary: str


# ------------------------------------------------------------------------------------------ values


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(options)}"


def parse_value(text: Any, kind: Any, key: str) -> Any:
    """`text` (a flag's string, or a YAML value) as a value of type `kind` (bool, int, float, str, dict, X | None)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(kind) if t is not type(None)]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null")):
            return None
        return parse_value(text, options[0], key)
    if kind is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(text, str) and text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r} is not a boolean; use true or false")
    if kind in (int, float):
        if isinstance(text, bool):
            raise ValueError(f"{key}={text!r} is not a number")
        if isinstance(text, (int, float)):
            if kind is int and float(text) != int(text):
                raise ValueError(f"{key}={text!r} is not an integer")
            return kind(text)
        try:
            return int(text) if kind is int else float(text)
        except (TypeError, ValueError):
            try:  # 1e3 for an int field
                value = float(text)
            except (TypeError, ValueError):
                raise ValueError(f"{key}={text!r} is not {'an integer' if kind is int else 'a number'}") from None
            if kind is int and value != int(value):
                raise ValueError(f"{key}={text!r} is not an integer") from None
            return kind(value)
    if kind is str:
        if isinstance(text, (dict, list)):
            raise ValueError(f"{key}={text!r} must be a string")
        return str(text)
    if kind is dict or origin is dict:
        if isinstance(text, dict):
            return dict(text)
        try:
            value = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            value = None
        if not isinstance(value, dict):
            raise ValueError(f'{key}={text!r} is not a mapping; write it as JSON, e.g. {{"n_layer": 4}}')
        return value
    return text


def _scalar_from_text(text: str) -> Any:
    """A flag value for a free-form dict entry: JSON when it parses (numbers, true/false, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ------------------------------------------------------------------------------------------ building


def _apply(values: dict[str, dict[str, Any]], key: str, raw: Any, from_text: bool, schema: Schema) -> None:
    """Set dotted `key` (section.field or section.field.sub for dict fields) in `values`, checked and typed."""
    section, _, rest = key.partition(".")
    if section not in schema.sections:
        raise ValueError(f"unknown config section {section!r} in {key!r}{_suggest(section, list(schema.sections))}")
    if not rest:
        raise ValueError(f"{key!r} names a section, not a key; write {section}.KEY=VALUE")
    cls = schema.sections[section]
    names = [f.name for f in dataclasses.fields(cls)]
    name, _, sub = rest.partition(".")
    if name not in names:
        raise ValueError(
            f"unknown config key {key!r}{_suggest(f'{section}.{name}', [f'{section}.{n}' for n in names])}"
        )
    kind = _field_type(cls, name)
    target = values.setdefault(section, {})
    if sub:
        if not (kind is dict or typing.get_origin(kind) is dict):
            raise ValueError(f"{section}.{name} is not a mapping, so {key!r} cannot set a sub-key")
        target.setdefault(name, {})[sub] = _scalar_from_text(raw) if from_text else raw
        return
    target[name] = parse_value(raw, kind, key)


def _build(values: dict[str, dict[str, Any]], schema: Schema) -> Any:
    sections, defaults = {}, schema.root()
    for section in schema.sections:
        try:
            sections[section] = dataclasses.replace(getattr(defaults, section), **values.get(section, {}))
        except ValueError as error:
            message = str(error)
            raise ValueError(message if message.startswith(f"{section}.") else f"{section}: {message}") from None
    return schema.root(**sections)


def config_from_dict(data: dict, source: str, schema: Schema) -> Any:
    """A config from a nested mapping (a YAML file, or `to_dict()` stored in a checkpoint)."""
    values: dict[str, dict[str, Any]] = {}
    _merge(values, data, source, schema)
    return _build(values, schema)


def _merge(values: dict, data: Any, source: str, schema: Schema) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a mapping of sections ({', '.join(schema.sections)})")
    for section, entries in data.items():
        if section not in schema.sections:
            raise ValueError(
                f"unknown config section {section!r} in {source}{_suggest(str(section), list(schema.sections))}"
            )
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ValueError(f"section {section!r} in {source} must be a mapping of key: value")
        for name, raw in entries.items():
            _apply(values, f"{section}.{name}", raw, from_text=False, schema=schema)


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; see configs/ for recipes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return data or {}


def _flag_pairs(argv: list[str]) -> list[tuple[str, str | None]]:
    """["--a.b=1", "--c", "2", "--resume"] -> [("a.b", "1"), ("c", "2"), ("resume", None)]."""
    pairs, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}; flags look like --section.key=value (see --help)")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = None
        pairs.append((key, value))
        i += 1
    return pairs


def parse_args(argv: list[str], schema: Schema) -> Any:
    """A config from command-line arguments: defaults, then `--config FILE.yaml`, then the flags in order."""
    pairs = _flag_pairs(list(argv))
    values: dict[str, dict[str, Any]] = {}
    for key, value in pairs:
        if key == "config":
            if value is None:
                raise ValueError("--config needs a YAML file: --config configs/default.yaml")
            _merge(values, load_yaml(value), value, schema)
    for key, value in pairs:
        if key == "config":
            continue
        dotted = schema.aliases.get(key, key.replace("-", "_") if "." not in key else key)
        section, _, rest = dotted.partition(".")
        if "." not in dotted:
            options = [f"--{a}" for a in schema.aliases] + ["--config"] + [f"--{k}" for k in all_keys(schema)]
            raise ValueError(f"unknown flag --{key}{_suggest(f'--{key}', options)}")
        if value is None:
            known = section in schema.sections and rest in _names(section, schema)
            if known and _field_type(schema.sections[section], rest) is bool:
                value = "true"
            elif known:
                raise ValueError(f"--{key} needs a value: --{key}=VALUE")
            else:
                _apply(values, dotted, "", from_text=True, schema=schema)  # raises: unknown key, with suggestions
        _apply(values, dotted, value, from_text=True, schema=schema)
    return _build(values, schema)


def _names(section: str, schema: Schema) -> list[str]:
    return [f.name for f in dataclasses.fields(schema.sections[section])]


def all_keys(schema: Schema) -> list[str]:
    return [f"{section}.{name}" for section in schema.sections for name in _names(section, schema)]


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(t) for t in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind)).replace("NoneType", "None")


def _comment_help(cls: type) -> dict[str, str]:
    """Help for dataclasses that document fields with trailing comments (OptimConfig): {field: comment}."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, flags=re.M))


def help_text(schema: Schema) -> str:
    """`lmforge <command> --help`: every key with its type, default and help, from the dataclasses."""
    lines = [
        f"usage: lmforge {schema.command} [--config FILE.yaml] [--section.key=value ...]",
        "",
        schema.summary,
        "",
        "stable flags:",
    ]
    for alias, key in schema.aliases.items():
        lines.append(f"  --{alias:<14} = --{key}")
    lines.append("  --config FILE   a YAML recipe (see configs/)")
    for section, cls in schema.sections.items():
        lines += ["", f"{section}:"]
        defaults, comments = getattr(schema.root(), section), _comment_help(cls)
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            kind = _type_name(_field_type(cls, f.name))
            help_ = f.metadata.get("help", comments.get(f.name, ""))
            lines.append(f"  --{section}.{f.name}={kind} (default {default!r})  {help_}".rstrip())
    return "\n".join(lines)


def differing_fields(saved: dict, current: dict, sections: tuple[str, ...] = ("model", "data")) -> list[str]:
    """Dotted keys whose values differ between two `RunConfig.to_dict()`s, in the sections that make a run."""
    diffs = []
    for section in sections:
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs
