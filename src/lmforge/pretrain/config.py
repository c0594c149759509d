"""The pretraining config: `RunConfig(model, data, optim, train)` and its `Schema` for YAML, flags and --help.

`optim` (`lmforge.train.optim.OptimConfig`) and `train` (`lmforge.train.config.TrainSection`) are the
engine's sections, shared with fine-tuning; `model` and `data` are pretraining's own. The parser, validation
and `--help` are the engine's (`lmforge.train.config`), driven by `PRETRAIN`.

    lmforge pretrain --config configs/shakespeare-char.yaml --train.batch_size=32 --max-steps 500
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.train import config
from lmforge.train.config import PrivacySection, Schema, TrainSection, opt
from lmforge.train.optim import OptimConfig


@dataclass
class ModelSection:
    name: str = opt("gpt-tiny", "preset (lmforge models), family (gpt, llama, bert, ...) or a saved model folder")
    overrides: dict = opt({}, "model config fields to change, e.g. {n_layer: 4, d_model: 256}")
    dropout: float = opt(0.0, "dropout on embeddings, residual branches and attention weights")


@dataclass
class DataSection:
    dataset: str = opt("shakespeare-small", "catalog name (lmforge data list), a text file/folder/glob, or shards")
    tokenizer: str = opt("char", "char | gpt2 | train (learn a byte-level BPE) | path to a tokenizer")
    vocab_size: int = opt(4096, "vocabulary size when tokenizer=train")
    block_size: int = opt(128, "tokens per training window (context length; translation: per sentence)")
    val_fraction: float = opt(0.1, "held-out fraction when the dataset has no validation split")
    text_field: str = opt("text", "JSON field holding the text, for JSONL/Parquet files")
    mlm_probability: float = opt(0.15, "masked LM: fraction of tokens to predict")
    noise_density: float = opt(0.15, "span corruption: fraction of tokens dropped")
    source_lang: str = opt("en", "translation: record field of the source sentence")
    target_lang: str = opt("es", "translation: record field of the target sentence")
    max_pairs: int = opt(0, "translation: use only the first N training pairs (0: all)")

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"data.block_size={self.block_size} must be >= 2 (a window predicts block_size - 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.vocab_size < 2:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be >= 2")
        if self.max_pairs < 0:
            raise ValueError(f"data.max_pairs={self.max_pairs} must be >= 0 (0: all pairs)")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=50))
    train: TrainSection = field(default_factory=TrainSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)  # causal LM only: examples are fixed windows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{Path(self.model.name).name}-{Path(self.data.dataset).stem}"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) / self.run_name


PRETRAIN = Schema(
    RunConfig,
    {
        "model": ModelSection,
        "data": DataSection,
        "optim": OptimConfig,
        "train": TrainSection,
        "privacy": PrivacySection,
    },
    {
        "model": "model.name",
        "data": "data.dataset",
        "out": "train.out",
        "max-steps": "train.max_steps",
        "save-every": "train.save_every",
        "eval-every": "train.eval_every",
        "seed": "train.seed",
        "resume": "train.resume",
    },
    "pretrain",
    "Pretrain a model. Settings come from the defaults below, then --config, then flags (in that order).",
)


def parse_args(argv: list[str]) -> RunConfig:
    """A pretraining config from command-line arguments (defaults, then --config FILE.yaml, then flags)."""
    return config.parse_args(argv, PRETRAIN)


def help_text() -> str:
    """`lmforge pretrain --help`."""
    return config.help_text(PRETRAIN)
