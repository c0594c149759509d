"""`Task`: everything one fine-tuning task owns, in one object the recipe treats like any other task.

A task is a strategy object (STYLE.md, lesson 7): the recipe, the dataset loader and evaluate/predict call the
same surface for every task and never branch on its name. Its parts, before any tokenizer exists (classmethods):

    reads_catalog(name, kind), catalog_records(...)  -> records of a catalog (or derived) set's split
    read_file(path, config)                          -> records of a user's labelled file
    texts(records)                                   -> the text a preset's tokenizer is learned on
    strata(records)                                  -> the label each record is stratified by (or None)
    from_data(config, tokenizer, data)               -> the task of a run (labels from the training records)
    from_saved(config, tokenizer, record)            -> the task again, around a saved model's task.json

and once built around a tokenizer:

    encode(records, split)             -> features (lists of ids, labels), counted truncations in `stats`
    count(batch), loss_sum(model, b)   -> the training loss as an `Objective` of the shared loop
    evaluate(model, records, features, final) -> (metrics from `lmforge.eval`, arrays for plots)
    predict(model, records, features)  -> one prediction per record (label, tags, answer, text)
    input_record(row, number)          -> an unlabelled record from a prediction input
    saved_fields()                     -> what task.json keeps beyond the config (the label set)

Each task also names its `head` and its `default_model` (the model a run starts from when `model.name` is not
given: real pretrained weights where lmforge has them offline). Subclasses register themselves by `name` in
`TASKS` as they are defined; a named task that leaves a part of the surface abstract, or sets no `head` or
`default_model`, is refused at import, so a new task cannot half-exist.

Final evaluation and prediction can take minutes (generation, large sets): inside `task.reporting_progress(label)`
every pass over the data shows a progress bar on stderr (`lmforge.finetune.progress.EvalProgress`) when
train.progress is on. Evaluations while training run without one: the training bar owns the terminal then.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from lmforge.finetune.progress import EvalProgress
from lmforge.train.loop import autocast
from lmforge.train.objective import Objective

if TYPE_CHECKING:
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

TASKS: dict[str, type[Task]] = {}  # name -> task class, in the order the task modules are imported


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries the model's forward takes (token_type_ids only for BERT-style encoders)."""
    from lmforge.train.distributed import unwrap_model

    accepted = inspect.signature(unwrap_model(model).forward).parameters
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and k in accepted}


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def field_of(row: dict | str, *keys: str) -> Any:
    """A prediction input's text: the first of `keys` a JSON object (or CSV row) has, or the whole row when it is
    a line of text. Tasks pass the field the model was trained with first, then the generic name."""
    if not isinstance(row, dict):
        return row
    return next((row[key] for key in keys if row.get(key) is not None), None)


def needs(*keys: str) -> str:
    """'needs a 'review' or 'text' string': what an input lacks, naming each accepted field once."""
    return f"needs a {' or '.join(repr(k) for k in dict.fromkeys(keys))} string"


class Task(Objective, ABC):
    """The shared parts of every task (padding, batched forward passes, the evaluation loss, reading prediction
    inputs) and the abstract surface each task fills in (see the module docstring)."""

    name: ClassVar[str]
    head: ClassVar[str] = ""  # the model head the task trains (`lmforge.models.config.HEADS`)
    default_model: ClassVar[str] = ""  # model.name when none is given: pretrained where available, else a preset
    feature_unit: ClassVar[str] = "examples"  # what one feature is, as the progress bars count them
    record_unit: ClassVar[str] = "examples"  # what one record is, as the start line counts them
    predicts_from_features: ClassVar[bool] = True  # False: predict() reads the records, features are not built

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # a shared intermediate (e.g. the generation tasks' base) is no task
            return
        abstract = sorted(n for n in dir(cls) if getattr(inspect.getattr_static(cls, n), "__isabstractmethod__", 0))
        missing = abstract + [part for part in ("head", "default_model") if not getattr(cls, part)]
        if missing:
            raise TypeError(
                f"task {cls.name!r} ({cls.__qualname__}) does not implement {', '.join(missing)}: every task fills in "
                "the whole surface of lmforge.finetune.tasks.base.Task"
            )
        if cls.name in TASKS:
            raise TypeError(f"two tasks are named {cls.name!r}: {TASKS[cls.name].__qualname__} and {cls.__qualname__}")
        TASKS[cls.name] = cls

    def __init__(self, config: FinetuneConfig, tokenizer: Tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.stats: dict[str, int] = {}
        self.progress_label: str | None = None  # set by `reporting_progress`: passes over the data show a bar

    # -------------------------------------------------------------------------------- records (no tokenizer yet)

    @classmethod
    @abstractmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        """Whether the catalog (or derived) set `name`, of `kind`, can feed this task."""

    @classmethod
    @abstractmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        """The task's records of one split (`rows`, as the catalog stores them) of the set `name`."""

    @classmethod
    @abstractmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        """The task's records of a user's labelled file (it exists)."""

    @classmethod
    @abstractmethod
    def texts(cls, records: list) -> list[str]:
        """The text of each record a preset's tokenizer is learned on."""

    @classmethod
    def strata(cls, records: list) -> list[str] | None:
        """The label each record is stratified by (K-fold folds, the held-out validation split); None: the task's
        records are split at random."""
        return None

    @classmethod
    def from_data(cls, config: FinetuneConfig, tokenizer: Tokenizer, data: TaskData) -> Task:
        """The task of a run; tasks with a label set read it from `data`."""
        return cls(config, tokenizer)

    @classmethod
    def from_saved(cls, config: FinetuneConfig, tokenizer: Tokenizer, record: dict) -> Task:
        """The task around a saved model, from its task.json `record` (the run's config and `saved_fields`)."""
        return cls(config, tokenizer)

    def saved_fields(self) -> dict[str, Any]:
        """What task.json keeps beyond the run's config, for `from_saved`."""
        return {}

    # -------------------------------------------------------------------------------- model and training

    def model_overrides(self) -> dict[str, Any]:
        """Model config fields the task sets (the number of labels of a classification head)."""
        return {}

    def saved_tokenizer(self) -> Tokenizer:
        """The tokenizer saved beside the fine-tuned model."""
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    @abstractmethod
    def encode(self, records: list, split: str) -> list[dict]:
        """Features of `records`; truncations and other counts go to `self.stats` under `split`."""

    @abstractmethod
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The units the batch's loss averages over (examples, labelled tokens, class weights)."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss summed over the batch's `count` units."""

    def smoothing(self, model: nn.Module) -> float:
        """task.label_smoothing while the model trains, 0 in evaluation: validation and test losses stay the
        plain negative log-likelihood, comparable across runs (and tuning trials) with any smoothing."""
        return self.config.task.label_smoothing if model.training else 0.0

    # -------------------------------------------------------------------------------- evaluation and prediction

    @abstractmethod
    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        """(metrics, arrays for plots) of `records`. `final` is False while training, where a task may skip
        costly scores (generation) and keep the loss the checkpoint is chosen by."""

    @abstractmethod
    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        """One JSON-ready prediction per record, in order."""

    @abstractmethod
    def input_record(self, row: dict | str, number: int) -> Any:
        """The unlabelled record of the `number`-th prediction input (from 1): a JSON object, or a line of text
        where one text is enough. A ValueError says what the input lacks; `read_inputs` adds where it is."""

    def read_inputs(self, path: str | Path) -> list:
        """Unlabelled records from a JSONL file (one object a line), a CSV/TSV file with a header row (one input a
        row), or a text file (one input a line)."""
        from lmforge.data.readers.records import iter_jsonl, iter_lines

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} not found")
        rows: list[dict | str]
        if path.suffix == ".jsonl":
            rows = [record for _, record in iter_jsonl(path)]
        elif path.suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            rows = [line.rstrip("\n") for _, line in iter_lines(path) if line.strip()]
        if not rows:
            raise ValueError(f"{path} holds no inputs")
        records = []
        for i, row in enumerate(rows, 1):
            try:
                records.append(self.input_record(row, i))
            except ValueError as error:
                raise ValueError(f"{path}:{i}: {error}") from None
        return records

    @contextlib.contextmanager
    def reporting_progress(self, label: str) -> Iterator[None]:
        """Inside, every pass over the data shows a progress bar headed `label` (when train.progress is on)."""
        previous, self.progress_label = self.progress_label, label
        try:
            yield
        finally:
            self.progress_label = previous

    def progress(self, action: str, total: int, unit: str = "") -> EvalProgress:
        """The bar of one pass over `total` items (`unit`, default the task's `feature_unit`); a no-op outside
        `reporting_progress` or with train.progress off."""
        enabled = self.progress_label is not None and self.config.train.progress
        return EvalProgress(f"{self.progress_label}: {action}", total, unit or self.feature_unit, enabled=enabled)

    def forward_batches(
        self, model: nn.Module, features: list[dict]
    ) -> Iterator[tuple[Sequence[dict], dict[str, torch.Tensor], torch.Tensor]]:
        """(features of the batch, batch tensors, logits) over `features` in order, without gradients."""
        from lmforge.finetune.batches import collate

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with self.progress("predicting", len(features)) as bar:
                for chunk in batched(features, self.config.task.predict_batch_size):
                    batch = {k: v.to(device) for k, v in collate(list(chunk), self.pad_id).items()}
                    with torch.no_grad(), autocast(self.config.train.dtype, device):
                        logits = model(**model_inputs(model, batch)).logits.float()
                    yield chunk, batch, logits
                    bar.advance(len(chunk))
        finally:
            model.train(was_training)

    def eval_loss(self, model: nn.Module, features: list[dict]) -> float:
        """Mean training loss over `features`: sum_b loss_sum(b) / sum_b count(b), the unit-weighted mean the loop
        optimises."""
        from lmforge.finetune.batches import collate

        device = next(model.parameters()).device
        total, units = 0.0, 0.0
        was_training = model.training
        model.eval()
        try:
            with self.progress("loss", len(features)) as bar:
                for chunk in batched(features, self.config.task.predict_batch_size):
                    batch = {k: v.to(device) for k, v in collate(list(chunk), self.pad_id).items()}
                    with torch.no_grad(), autocast(self.config.train.dtype, device):
                        total += float(self.loss_sum(model, batch))
                    units += float(self.count(batch))
                    bar.advance(len(chunk))
        finally:
            model.train(was_training)
        return total / max(units, 1.0)
