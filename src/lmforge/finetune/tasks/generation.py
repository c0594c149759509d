"""What the two text-generating tasks (seq2seq, sft) share: a teacher-forced loss and generated text scored
against references.

Loss: cross-entropy per target token with teacher forcing (`lmforge.train.objective.summed_token_loss`); each
task says which tokens are targets. While training, evaluation is the loss and perplexity exp(loss) alone;
the final evaluation also generates text for `task.eval_examples` records spread over the set and scores it
(BLEU, chrF, ROUGE, exact match).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lmforge.finetune.tasks.base import Task
from lmforge.nn.loss import IGNORE_INDEX


def eval_subset(records: Sequence, n: int) -> list:
    """`n` records spread evenly over the set (all when n is 0 or covers it): sets sorted by label or source
    (a catalog's positives first, a Bible's books in order) are then sampled across, not from the front."""
    if not n or n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


def _score(value: Any) -> float:
    if isinstance(value, dict):
        for key in ("score", "fmeasure", "f1", "f"):
            if key in value:
                return float(value[key])
    return float(getattr(value, "score", getattr(value, "fmeasure", value)))


class GenerationTask(Task):
    """The shared base of seq2seq and sft (no task itself: it has no name)."""

    predicts_from_features: ClassVar[bool] = False  # predictions are generated from the records' prompts

    @abstractmethod
    def reference(self, record: Any) -> str:
        """The text a record's generated output is scored against."""

    @abstractmethod
    def generate(self, model: nn.Module, records: list) -> list[str]:
        """The model's output text for each record's prompt, in batches of `task.predict_batch_size`, advancing
        `self.progress("generating", len(records))` batch by batch."""

    @abstractmethod
    def shown_input(self, record: Any) -> dict[str, str]:
        """The input a prediction repeats beside its output (the prompt or the source, as the user wrote it)."""

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T): the token each position predicts, IGNORE_INDEX where none."""
        return batch["labels"]

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lmforge.train.objective import summed_token_loss

        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return summed_token_loss(model, inputs, self.targets(batch), self.smoothing(model))

    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        """Teacher-forced loss and perplexity; when `final`, generated text scored against the references on
        `task.eval_examples` records spread over the set (loss on the same records, so the numbers agree)."""
        if final:
            subset = eval_subset(records, self.config.task.eval_examples)
            if len(subset) < len(records):
                records, features = subset, self.encode(subset, "evaluation")
        loss = self.eval_loss(model, features)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if final:
            metrics.update(self.text_scores(records, self.generate(model, records)))
            metrics["generated_examples"] = len(records)
        return metrics, {}

    def text_scores(self, records: list, outputs: list[str]) -> dict[str, float]:
        """BLEU, chrF and ROUGE as `lmforge.eval` gives them, and exact match: the percentage of outputs equal
        to their reference once case, spacing and final punctuation are normalised."""
        from lmforge.eval import bleu, chrf, rouge

        references = [self.reference(r) for r in records]
        scores = {"bleu": _score(bleu(outputs, references)), "chrf": _score(chrf(outputs, references))}
        for name, value in rouge(outputs, references).items():
            scores[name] = _score(value)
        scores["exact_match"] = 100.0 * float(
            np.mean([_norm(o) == _norm(r) for o, r in zip(outputs, references, strict=True)])
        )
        return scores

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        outputs = self.generate(model, records)
        return [{**self.shown_input(r), "output": text} for r, text in zip(records, outputs, strict=True)]
