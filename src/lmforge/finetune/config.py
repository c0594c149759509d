"""The fine-tuning config: five typed sections, parsed like pretraining's (`lmforge.train.config`).

    lmforge finetune --task classification --model all-MiniLM-L6-v2 --data pang-lee-sentences --kfold 10

A run is `FinetuneConfig(model, data, task, optim, train)`. `optim` and `train` are pretraining's sections
(the same loop runs both), with fine-tuning defaults: a small learning rate with linear decay, as BERT's
recipe (Devlin et al., 2019) and Hugging Face's Trainer use. The defaults start from real pretrained weights
(each task's `default_model`) at lr 1e-4, which all-MiniLM-L6-v2 needs to learn in one epoch (5e-5, the
usual BERT-base rate, barely moves a model this small in a short run).

A run's length is set once: `task.epochs` (passes over the training set) or `train.max_steps` (optimizer
steps). Both default to None, meaning 3 epochs; the one the user sets rules, and setting both is an error
(`lmforge.finetune.recipe.training_steps`), so neither silently overrides the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.finetune.augment import AUGMENTERS
from lmforge.finetune.baselines import baseline_names
from lmforge.finetune.tasks import TASKS
from lmforge.train.config import PrivacySection, Schema, TrainSection, opt
from lmforge.train.optim import OptimConfig

METHODS = ("full", "lora")


@dataclass
class FTModelSection:
    name: str = opt(
        "",
        "a Hugging Face folder, an lmforge checkpoint, a .gguf file, a real model name (all-MiniLM-L6-v2, "
        "SmolLM2-135M-Instruct) or a preset (random weights); default: the task's pretrained model "
        "(all-MiniLM-L6-v2 for classification, token-classification and qa, SmolLM2-135M-Instruct for sft; "
        "seq2seq has none offline: the transformer-tiny preset)",
    )
    tokenizer: str = opt("", "tokenizer file/folder (default: the model's own; presets: learn a BPE on the data)")
    vocab_size: int = opt(2048, "vocabulary of the BPE learned for a preset")
    embeddings: str = opt(
        "", "a preset (lstm-seed, ...): start its embedding from this model's table and use its tokenizer"
    )
    dropout: float = opt(0.1, "dropout while fine-tuning")
    overrides: dict = opt({}, """model config fields to change, as JSON, e.g. '{"n_layer": 2}'""")


@dataclass
class FTDataSection:
    dataset: str = opt(
        "pang-lee-sentences", "catalog name (lmforge data list) or a file: CSV/TSV/JSONL, CoNLL, SQuAD JSON"
    )
    validation: str = opt("", "validation file (default: the catalog's held-out split, or val_fraction of train)")
    test: str = opt("", "test file evaluated once at the end (default: the catalog's test split, if any)")
    val_fraction: float = opt(0.1, "held-out fraction of train for validation when there is no validation set")
    max_examples: int = opt(0, "use only the first N training examples (0: all)")
    max_length: int = opt(128, "tokens per input; longer inputs are truncated (and counted)")
    text_field: str = opt("text", "classification: field/column of the text")
    text_pair_field: str = opt("", "classification: field of the second text of a pair (empty: single text)")
    label_field: str = opt("label", "classification: field of the label")
    multi_label: bool = opt(False, "classification: labels separated by '|', a sigmoid per label")
    doc_stride: int = opt(32, "qa: tokens shared by consecutive windows of a long context (below the window)")
    max_query_length: int = opt(64, "qa: tokens kept of each question")
    max_answer_length: int = opt(30, "qa: longest answer span predicted, in tokens")
    n_best: int = opt(20, "qa: start/end candidates per window")
    version_2: bool = opt(False, "qa: SQuAD v2, questions may have no answer")
    source_field: str = opt("en", "seq2seq: field of the source text")
    target_field: str = opt("es", "seq2seq: field of the target text")
    max_target_length: int = opt(128, "seq2seq: tokens per target")
    prefix: str = opt("", "seq2seq: text put before every source, e.g. 'translate English to Spanish: '")
    augment: str = opt("", "add variants of the training records (never validation/test): eda | backtranslate")
    augment_factor: int = opt(2, "augment: the training set grows K-fold, each record plus K - 1 variants")
    augment_model: str = opt("", "backtranslate: a fine-tuned seq2seq model (run or model folder), source -> pivot")
    augment_back_model: str = opt("", "backtranslate: a fine-tuned seq2seq model, pivot -> source")

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("max_length", "max_target_length", "doc_stride", "max_query_length", "max_answer_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.max_examples < 0:
            raise ValueError(f"data.max_examples={self.max_examples} must be >= 0 (0: all)")
        if self.augment and self.augment not in AUGMENTERS:
            raise ValueError(f"data.augment={self.augment!r} is not one of {', '.join(AUGMENTERS)}")
        if isinstance(self.augment_factor, bool) or not isinstance(self.augment_factor, int) or self.augment_factor < 1:
            raise ValueError(
                f"data.augment_factor={self.augment_factor!r} must be an integer >= 1: the training set grows K-fold"
            )


@dataclass
class TaskSection:
    task: str = opt("classification", " | ".join(TASKS))
    method: str = opt("full", "full | lora")
    epochs: float | None = opt(
        None, "passes over the training set; default 3 unless train.max_steps is set (set one, not both)"
    )
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is B A x alpha / r")
    lora_dropout: float = opt(0.05, "dropout on the LoRA branch input")
    lora_targets: str = opt("qkv,out", "comma-separated Linear names that get LoRA (lmforge names)")
    merge: bool = opt(True, "LoRA: also save the model with the adapter merged into the weights")
    freeze_embeddings: bool = opt(False, "keep the embeddings fixed")
    freeze_layers: int = opt(0, "keep the first N Transformer layers fixed")
    keep_sparsity: bool = opt(
        True, "a model pruned by lmforge prune (its sparsity.json) keeps its zeros while training; false: they refill"
    )
    layer_lr_decay: float = opt(1.0, "layer-wise lr decay: layer i of L trains at lr x decay^(L - i) (1: off)")
    label_smoothing: float = opt(
        0.0, "train against (1 - e) one-hot + e uniform targets (Szegedy et al. 2016); evaluation losses stay plain"
    )
    class_weights: str = opt("", "classification loss weights: '' (none), 'balanced', or one number per label")
    kfold: int = opt(0, "K-fold cross-validation on train + validation (stratified for classification; 0: off)")
    baseline: str = opt(
        "",
        "comma-separated baselines fitted and scored on the run's own splits/folds: tfidf, frozen-lr, lstm "
        "(classification); most-frequent-tag, lstm (token-classification)",
    )
    num_beams: int = opt(4, "seq2seq: beam width at evaluation")
    max_new_tokens: int = opt(64, "seq2seq/sft: tokens generated per evaluation example")
    eval_examples: int = opt(200, "seq2seq/sft: held-out examples generated for the end-of-run scores (0: all)")
    predict_batch_size: int = opt(32, "batch size of evaluation and prediction")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task.task={self.task!r} is not one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise ValueError(f"task.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.epochs is not None and self.epochs < 0:
            raise ValueError(f"task.epochs={self.epochs} must be >= 0 (0: train.max_steps sets the length)")
        baseline_names(self.baseline, self.task)
        if self.kfold == 1 or self.kfold < 0:
            raise ValueError(f"task.kfold={self.kfold} must be 0 (off) or >= 2")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"task.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]")
        for name in ("lora_r", "num_beams", "max_new_tokens", "predict_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 1")
        for name in ("freeze_layers", "eval_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 0")


@dataclass
class FTTrainSection(TrainSection):
    """Pretraining's loop settings, except that `max_steps` may be left unset (None): a fine-tuning run's length
    then comes from task.epochs, and the recipe can tell a length the user chose from a default."""

    max_steps: int | None = opt(None, "optimizer steps; default: task.epochs passes (set one, not both)")

    def __post_init__(self) -> None:
        if self.max_steps is None:
            checked = dataclasses.replace(self, max_steps=1)  # checks every other field as TrainSection does
            self.batch_size, self.grad_accum = checked.batch_size, checked.grad_accum  # as split there
        else:
            super().__post_init__()


def _finetune_train() -> FTTrainSection:
    return FTTrainSection(batch_size=16, eval_every=100, eval_batches=1, save_every=0, keep_last=1, sample_tokens=0)


@dataclass
class FinetuneConfig:
    model: FTModelSection = field(default_factory=FTModelSection)
    data: FTDataSection = field(default_factory=FTDataSection)
    task: TaskSection = field(default_factory=TaskSection)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, min_lr=0.0, warmup_steps=0, schedule="linear", weight_decay=0.01)
    )
    train: FTTrainSection = field(default_factory=_finetune_train)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    @property
    def model_name(self) -> str:
        """model.name, else the task's default model (pretrained where one exists offline, else a preset)."""
        return self.model.name or TASKS[self.task.task].default_model

    def with_model_name(self) -> FinetuneConfig:
        """The config with model.name filled in (`model_name`), as the recipe runs and task.json records it."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, name=self.model_name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        return self.train.name or f"{Path(self.model_name).stem}-{Path(self.data.dataset).stem}-{self.task.task}"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out) / self.run_name


FINETUNE = Schema(
    FinetuneConfig,
    {
        "model": FTModelSection,
        "data": FTDataSection,
        "task": TaskSection,
        "optim": OptimConfig,
        "train": FTTrainSection,
        "privacy": PrivacySection,
    },
    {
        "task": "task.task",
        "model": "model.name",
        "data": "data.dataset",
        "out": "train.out",
        "max-steps": "train.max_steps",
        "epochs": "task.epochs",
        "method": "task.method",
        "kfold": "task.kfold",
        "baseline": "task.baseline",
        "save-every": "train.save_every",
        "eval-every": "train.eval_every",
        "seed": "train.seed",
        "resume": "train.resume",
    },
    "finetune",
    "Fine-tune a model on a task. Settings come from the defaults below, then --config, then flags (in order).",
)
