"""Sequence classification: one label per text (or text pair), or several with `data.multi_label`.

Records are `ClassificationExample`s: from the catalog's classification sets, or a user's CSV/TSV/JSONL file
(`data.text_field`, `data.text_pair_field`, `data.label_field`). Prediction inputs are JSONL objects or CSV rows
with the text under the field the model was trained with (or "text"; the pair under its field or "text_pair"),
or lines of text; each prediction repeats its input text beside the label.

Loss per unit the loop averages over: cross-entropy per example, or w_y x CE with class weights, whose units
are then the weights (so the mean is sum_i w_{y_i} CE_i / sum_i w_{y_i}, as torch's weighted mean);
multi-label: mean binary cross-entropy over the labels of each example. Metrics: `lmforge.eval`'s
classification report (accuracy, F1, ROC AUC), with ROC, precision-recall and confusion plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.readers.records import ClassificationExample, LabelVocab
from lmforge.finetune.tasks.base import Task, field_of, model_inputs, needs

if TYPE_CHECKING:
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData


def class_weights(spec: str, vocab: LabelVocab, records: list | None) -> torch.Tensor | None:
    """'' -> None; 'balanced' -> n / (K n_k) over `records` (scikit-learn's balanced weights), None without
    records (a saved model's training counts are not kept, so it is scored unweighted); '1,2' -> as given."""
    if not spec:
        return None
    k = len(vocab)
    if spec == "balanced":
        if records is None:
            return None
        counts = np.zeros(k)
        for r in records:
            for label in r.labels:
                counts[vocab.id(label)] += 1
        if (counts == 0).any():
            missing = [vocab.labels[i] for i in np.flatnonzero(counts == 0)]
            raise ValueError(f"task.class_weights=balanced: labels {missing} never occur in the training set")
        return torch.tensor(counts.sum() / (k * counts), dtype=torch.float32)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"task.class_weights={spec!r}: write 'balanced' or {k} numbers, e.g. 1,2") from None
    if len(values) != k or any(v <= 0 for v in values):
        raise ValueError(f"task.class_weights needs {k} positive numbers (labels {list(vocab.labels)})")
    return torch.tensor(values, dtype=torch.float32)


class ClassificationTask(Task):
    name = "classification"
    head = "sequence_classification"
    default_model = "all-MiniLM-L6-v2"

    def __init__(
        self, config: FinetuneConfig, tokenizer: Tokenizer, labels: Sequence[str], weights: torch.Tensor | None
    ) -> None:
        super().__init__(config, tokenizer)
        self.vocab = LabelVocab(tuple(labels))
        self.multi_label = config.data.multi_label
        self.weights = weights

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return kind == "classification"

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        return [ClassificationExample(r["text"].strip(), (str(r["label"]),)) for r in rows]

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        from lmforge.data.readers.records import load_classification

        data = config.data
        loaded = load_classification(
            path,
            text_field=data.text_field,
            label_field=data.label_field,
            text_pair_field=data.text_pair_field or None,
            multi_label=data.multi_label,
        )
        return loaded.examples

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return [r.text + (" " + r.text_pair if r.text_pair else "") for r in records]

    @classmethod
    def strata(cls, records: list) -> list[str]:
        return ["|".join(r.labels) for r in records]

    @classmethod
    def from_data(cls, config: FinetuneConfig, tokenizer: Tokenizer, data: TaskData) -> ClassificationTask:
        """Labels in the catalog's order when it has a label set (those the training set holds), else sorted.
        A single label is refused here, before training: there is nothing to tell apart."""
        seen = {label for r in data.train for label in r.labels}
        if len(seen) < 2:
            found = f"only one label {next(iter(seen))!r}" if seen else "no labels"
            raise ValueError(
                f"the training data has {found}; classification needs at least two "
                f"(check data.label_field={config.data.label_field!r} and the file)"
            )
        labels = tuple(label for label in data.labels if label in seen) or tuple(sorted(seen))
        vocab = LabelVocab(labels)
        return cls(config, tokenizer, labels, class_weights(config.task.class_weights, vocab, data.train))

    @classmethod
    def from_saved(cls, config: FinetuneConfig, tokenizer: Tokenizer, record: dict) -> ClassificationTask:
        labels = tuple(record.get("labels") or ())
        return cls(config, tokenizer, labels, class_weights(config.task.class_weights, LabelVocab(labels), None))

    def saved_fields(self) -> dict[str, Any]:
        return {"labels": list(self.vocab.labels)}

    def model_overrides(self) -> dict[str, Any]:
        return {"num_labels": len(self.vocab)}

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_classification

        unknown = sorted({label for r in records for label in r.labels if label not in self.vocab})
        if unknown:
            raise ValueError(
                f"the {split} set has labels the training set never saw: {unknown[:10]}; "
                f"training labels: {list(self.vocab.labels)}"
            )
        features, stats = encode_classification(
            self.tokenizer, records, self.vocab, self.config.data.max_length, multi_label=self.multi_label
        )
        self.stats[f"{split}_truncated"] = int(stats.get("truncated", 0))
        return features

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.weights is not None and not self.multi_label:
            return self.weights.to(labels.device)[labels].sum()
        return torch.tensor(float(labels.shape[0]), device=labels.device)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**model_inputs(model, batch)).logits.float()
        labels, smoothing = batch["labels"], self.smoothing(model)
        if self.multi_label:  # each label a 2-class problem: targets y (1 - e) + e / 2
            targets = labels.float() * (1.0 - smoothing) + smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1).sum()
        weight = None if self.weights is None else self.weights.to(logits.device)
        return F.cross_entropy(logits, labels, weight=weight, reduction="sum", label_smoothing=smoothing)

    def probabilities(self, model: nn.Module, features: list[dict]) -> np.ndarray:
        """(N, K): a sigmoid per label (multi-label) or the softmax over labels."""
        parts = []
        for _, _, logits in self.forward_batches(model, features):
            parts.append((torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(self.vocab)))

    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        metrics, arrays = self.score(records, self.probabilities(model, features))
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, arrays

    def score(self, records: list, probs: np.ndarray) -> tuple[dict, dict]:
        """(metrics, arrays for plots) of predicted probabilities (N, K) over `self.vocab.labels` against the
        records' labels: what `evaluate` reports for the model, and for a baseline on the same records."""
        from lmforge.eval import classification_report

        labels = list(self.vocab.labels)
        if self.multi_label:
            y_true = np.array([self.vocab.multi_hot(r.labels) for r in records], dtype=int)
            metrics = classification_report(y_true, (probs >= 0.5).astype(int), probs=probs, labels=labels)
            arrays = {}
        else:
            y_true = [r.label for r in records]
            y_pred = [labels[i] for i in probs.argmax(-1)]
            metrics = classification_report(y_true, y_pred, probs=probs, labels=labels)
            arrays = {"y_true": y_true, "probs": probs, "labels": labels}
        return metrics, arrays

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        """The input text (under the trained field names) beside the label(s) and the probabilities."""
        data, out = self.config.data, []
        for record, row in zip(records, self.probabilities(model, features), strict=True):
            shown = {data.text_field: record.text}
            if record.text_pair is not None:
                shown[data.text_pair_field or "text_pair"] = record.text_pair
            probabilities = dict(zip(self.vocab.labels, map(float, row), strict=True))
            if self.multi_label:
                labels = [self.vocab.labels[i] for i in np.flatnonzero(row >= 0.5)]
                out.append({**shown, "labels": labels, "probabilities": probabilities})
            else:
                out.append({**shown, "label": self.vocab.labels[int(row.argmax())], "probabilities": probabilities})
        return out

    def input_record(self, row: dict | str, number: int) -> ClassificationExample:
        """The text under data.text_field (the field the model was trained with) or "text", the pair under
        data.text_pair_field or "text_pair", or a line of text; the label is a placeholder, never read."""
        data = self.config.data
        text = field_of(row, data.text_field, "text")
        if not isinstance(text, str):
            raise ValueError(needs(data.text_field, "text"))
        pair = field_of(row, *filter(None, (data.text_pair_field, "text_pair"))) if isinstance(row, dict) else None
        return ClassificationExample(text, (self.vocab.labels[0],), None if pair is None else str(pair))
