"""The five fine-tuning tasks: features, the training loss, evaluation with task metrics, predictions.

Every task is one class with the same parts, so the recipe (`lmforge.finetune.recipe`) treats them alike:

    encode(records, tokenizer)        -> features (lists of ids, labels), counted truncations in `stats`
    count(batch), loss_sum(model, b)  -> the training loss as an `Objective` of the shared loop
    predict(model, records, features) -> one prediction per record (label, tags, answer, text)
    score(records, predictions, ...)  -> metrics from `lmforge.eval`

Losses, per unit the loop averages over (gradient accumulation divides by the units of the whole batch):

- classification: cross-entropy per example, or w_y x CE with class weights, whose units are then the
  weights (so the mean is sum_i w_{y_i} CE_i / sum_i w_{y_i}, as torch's weighted mean); multi-label: mean
  binary cross-entropy over the labels of each example.
- token-classification: cross-entropy per labelled token (the first subword of each word).
- qa: (CE(start) + CE(end)) / 2 per window, the BERT SQuAD loss (Devlin et al., 2019, section 4.2).
- seq2seq: cross-entropy per target token, teacher forcing.
- sft: cross-entropy per response token: prompt tokens are context, never targets.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loaders import IGNORE_INDEX
from lmforge.train.loop import Objective, autocast

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries the model's forward takes (token_type_ids only for BERT-style encoders)."""
    from lmforge.train.distributed import unwrap_model

    accepted = inspect.signature(unwrap_model(model).forward).parameters
    return {k: batch[k] for k in MODEL_INPUTS if k in batch and k in accepted}


def eval_subset(records: Sequence, n: int) -> list:
    """`n` records spread evenly over the set (all when n is 0 or covers it): sets sorted by label or source
    (a catalog's positives first, a Bible's books in order) are then sampled across, not from the front."""
    if not n or n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Task(Objective):
    """Shared parts; subclasses fill in encode/loss/predict/score."""

    name = "task"
    head = ""

    def __init__(self, config, tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.stats: dict[str, int] = {}

    def model_overrides(self) -> dict[str, Any]:
        return {}

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def forward_batches(self, model: nn.Module, features: list[dict], fields: tuple[str, ...] = ()):
        """(features of the batch, batch tensors, logits) over `features` in order, without gradients."""
        from lmforge.finetune.batches import collate

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for chunk in batched(features, self.config.task.predict_batch_size):
                batch = {k: v.to(device) for k, v in collate(list(chunk), self.pad_id).items()}
                with torch.no_grad(), autocast(self.config.train.dtype, device):
                    logits = model(**model_inputs(model, batch)).logits.float()
                yield chunk, batch, logits
        finally:
            model.train(was_training)

    def eval_loss(self, model: nn.Module, features: list[dict]) -> float:
        """Mean training loss over `features` (the unit-weighted mean the loop optimises)."""
        from lmforge.finetune.batches import collate

        device = next(model.parameters()).device
        total, units = 0.0, 0.0
        was_training = model.training
        model.eval()
        try:
            for chunk in batched(features, self.config.task.predict_batch_size):
                batch = {k: v.to(device) for k, v in collate(list(chunk), self.pad_id).items()}
                with torch.no_grad(), autocast(self.config.train.dtype, device):
                    total += float(self.loss_sum(model, batch))
                units += float(self.count(batch))
        finally:
            model.train(was_training)
        return total / max(units, 1.0)


# ------------------------------------------------------------------------------------------ classification


class ClassificationTask(Task):
    name = "classification"
    head = "sequence_classification"

    def __init__(self, config, tokenizer, labels: Sequence[str], train_records: list) -> None:
        super().__init__(config, tokenizer)
        from lmforge.data.tasks import LabelVocab

        self.vocab = LabelVocab(tuple(labels))
        self.multi_label = config.data.multi_label
        self.weights = self._class_weights(config.task.class_weights, train_records)

    def _class_weights(self, spec: str, records: list) -> torch.Tensor | None:
        """'' -> None; 'balanced' -> n / (K n_k) (scikit-learn's balanced weights); '1,2' -> as given."""
        if not spec:
            return None
        k = len(self.vocab)
        if spec == "balanced":
            counts = np.zeros(k)
            for r in records:
                for label in r.labels:
                    counts[self.vocab.id(label)] += 1
            if (counts == 0).any():
                missing = [self.vocab.labels[i] for i in np.flatnonzero(counts == 0)]
                raise ValueError(f"task.class_weights=balanced: labels {missing} never occur in the training set")
            return torch.tensor(counts.sum() / (k * counts), dtype=torch.float32)
        try:
            values = [float(v) for v in spec.split(",")]
        except ValueError:
            raise ValueError(f"task.class_weights={spec!r}: write 'balanced' or {k} numbers, e.g. 1,2") from None
        if len(values) != k or any(v <= 0 for v in values):
            raise ValueError(f"task.class_weights needs {k} positive numbers (labels {list(self.vocab.labels)})")
        return torch.tensor(values, dtype=torch.float32)

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
        labels = batch["labels"]
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1).sum()
        weight = None if self.weights is None else self.weights.to(logits.device)
        return F.cross_entropy(logits, labels, weight=weight, reduction="sum")

    def probabilities(self, model: nn.Module, features: list[dict]) -> np.ndarray:
        parts = []
        for _, _, logits in self.forward_batches(model, features):
            parts.append((torch.sigmoid(logits) if self.multi_label else logits.softmax(-1)).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(self.vocab)))

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        probs = self.probabilities(model, features)
        out = []
        for row in probs:
            if self.multi_label:
                labels = [self.vocab.labels[i] for i in np.flatnonzero(row >= 0.5)]
                out.append(
                    {"labels": labels, "probabilities": dict(zip(self.vocab.labels, map(float, row), strict=True))}
                )
            else:
                out.append(
                    {
                        "label": self.vocab.labels[int(row.argmax())],
                        "probabilities": dict(zip(self.vocab.labels, map(float, row), strict=True)),
                    }
                )
        return out

    def evaluate(self, model: nn.Module, records: list, features: list[dict]) -> tuple[dict, dict]:
        """(metrics, arrays for plots)."""
        from lmforge.eval import classification_report

        probs = self.probabilities(model, features)
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
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, arrays


# ------------------------------------------------------------------------------------------ tagging


class TaggingTask(Task):
    name = "token-classification"
    head = "token_classification"

    def __init__(self, config, tokenizer, tags: Sequence[str], train_tags: Sequence[str] | None = None) -> None:
        super().__init__(config, tokenizer)
        self.tags = tuple(tags)
        self.train_tags = set(train_tags if train_tags is not None else tags)
        self.tag_to_id = {t: i for i, t in enumerate(self.tags)}
        self.is_bio = any(t.startswith(("B-", "I-")) for t in self.tags)

    def model_overrides(self) -> dict[str, Any]:
        return {"num_labels": len(self.tags)}

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_tagging

        unknown = sorted({t for r in records for t in r.tags if t not in self.tag_to_id})
        if unknown:
            raise ValueError(f"the {split} set has tags the model has no output for: {unknown[:10]}")
        unseen = sum(t not in self.train_tags for r in records for t in r.tags)
        if unseen and split != "train":  # the model cannot predict them: they count as errors, and are counted
            self.stats[f"{split}_tokens_with_tags_unseen_in_training"] = unseen
        features, stats = encode_tagging(self.tokenizer, records, self.tag_to_id, self.config.data.max_length)
        self.stats[f"{split}_truncated"] = int(stats.get("truncated", 0))
        return features

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**model_inputs(model, batch)).logits.float()
        return F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def word_tags(self, model: nn.Module, records: list, features: list[dict]) -> list[list[str]]:
        from lmforge.finetune.features import word_predictions

        out = []
        for chunk, _, logits in self.forward_batches(model, features):
            ids = logits.argmax(-1).cpu().tolist()
            for feature, row in zip(chunk, ids, strict=True):
                n = int(sum(feature["attention_mask"])) if "attention_mask" in feature else len(feature["input_ids"])
                out.append(word_predictions(row[:n], feature["word_ids"]))
        default = self.tag_to_id.get("O", 0)
        tags = []
        for record, predicted in zip(records, out, strict=True):
            predicted = list(predicted) + [default] * (len(record.tokens) - len(predicted))  # truncated words
            tags.append([self.tags[i] for i in predicted[: len(record.tokens)]])
        return tags

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        return [
            {"tokens": list(r.tokens), "tags": t}
            for r, t in zip(records, self.word_tags(model, records, features), strict=True)
        ]

    def evaluate(self, model: nn.Module, records: list, features: list[dict]) -> tuple[dict, dict]:
        from lmforge.eval import classification_report, tagging_report, token_accuracy

        predicted = self.word_tags(model, records, features)
        gold = [list(r.tags) for r in records]
        if self.is_bio:  # entity-level scores (seqeval's conventions) are the headline for BIO tags
            metrics = tagging_report(gold, predicted)
            metrics.update({f"entity_{k}": v for k, v in list(metrics.items()) if k.startswith("f1_")})
        else:  # per-token tags (POS): every token is one classification
            flat_true = [t for s in gold for t in s]
            flat_pred = [t for s in predicted for t in s]
            metrics = classification_report(flat_true, flat_pred, labels=list(self.tags))
            metrics["token_accuracy"] = token_accuracy(gold, predicted)
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, {}


# ------------------------------------------------------------------------------------------ qa


class QATask(Task):
    name = "qa"
    head = "question_answering"

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.qa import encode_qa

        d = self.config.data
        features, stats = encode_qa(
            self.tokenizer,
            records,
            max_length=d.max_length,
            doc_stride=d.doc_stride,
            max_query_length=d.max_query_length,
        )
        for key, value in stats.items():
            if isinstance(value, int):
                self.stats[f"{split}_{key}"] = value
        return features

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(float(batch["input_ids"].shape[0]), device=batch["input_ids"].device)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**model_inputs(model, batch)).logits.float()  # (B, T, 2)
        start = F.cross_entropy(logits[..., 0], batch["start_positions"], reduction="sum")
        end = F.cross_entropy(logits[..., 1], batch["end_positions"], reduction="sum")
        return (start + end) / 2

    def answers(self, model: nn.Module, records: list, features: list[dict]) -> dict[str, str]:
        from lmforge.finetune.qa import decode_qa

        starts, ends = [], []
        for _, batch, logits in self.forward_batches(model, features):
            mask = batch["attention_mask"].bool()
            for row in range(logits.shape[0]):
                n = int(mask[row].sum())
                starts.append(logits[row, :n, 0].cpu().numpy())
                ends.append(logits[row, :n, 1].cpu().numpy())
        d = self.config.data
        decoded = decode_qa(
            records,
            features,
            starts,
            ends,
            n_best=d.n_best,
            max_answer_length=d.max_answer_length,
            version_2=d.version_2,
        )
        return decoded[0] if isinstance(decoded, tuple) else decoded

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        answers = self.answers(model, records, features)
        return [{"id": r.id, "answer": answers.get(r.id, "")} for r in records]

    def evaluate(self, model: nn.Module, records: list, features: list[dict]) -> tuple[dict, dict]:
        from lmforge.eval import squad_exact_match, squad_f1

        answers = self.answers(model, records, features)
        predicted = [answers.get(r.id, "") for r in records]
        gold = [[a.text for a in r.answers] for r in records]
        metrics = {"exact_match": 100.0 * squad_exact_match(predicted, gold), "f1": 100.0 * squad_f1(predicted, gold)}
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, {}


# ------------------------------------------------------------------------------------------ generation tasks


class GenerationTask(Task):
    """Shared by seq2seq and sft: teacher-forced loss, generated text scored at the end of the run."""

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.targets(batch) != IGNORE_INDEX).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from lmforge.train.trainer import summed_loss

        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return summed_loss(model, inputs, self.targets(batch))

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["labels"]

    def evaluate(
        self, model: nn.Module, records: list, features: list[dict], generate: bool = True
    ) -> tuple[dict, dict]:
        """Teacher-forced loss and perplexity; with `generate`, generated text scored against the references on
        `task.eval_examples` records spread over the set (loss on the same records, so the numbers agree)."""
        if generate:
            subset = eval_subset(records, self.config.task.eval_examples)
            if len(subset) < len(records):
                records, features = subset, self.encode(subset, "evaluation")
        loss = self.eval_loss(model, features)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if generate:
            metrics.update(self.text_scores(records, self.generate(model, records)))
            metrics["generated_examples"] = len(records)
        return metrics, {}

    def text_scores(self, records: list, outputs: list[str]) -> dict[str, float]:
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
        return [{"output": text} for text in self.generate(model, records)]


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


def _score(value: Any) -> float:
    if isinstance(value, dict):
        for key in ("score", "fmeasure", "f1", "f"):
            if key in value:
                return float(value[key])
    return float(getattr(value, "score", getattr(value, "fmeasure", value)))


class Seq2SeqTask(GenerationTask):
    name = "seq2seq"
    head = "seq2seq_lm"

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_seq2seq

        d = self.config.data
        features, stats = encode_seq2seq(self.tokenizer, records, d.max_length, d.max_target_length)
        self.stats[f"{split}_truncated"] = int(stats.get("truncated", 0))
        return features

    def reference(self, record: tuple[str, str]) -> str:
        return record[1]

    def generate(self, model: nn.Module, records: list) -> list[str]:
        from lmforge.generate import generate

        tok, device = self.tokenizer, next(model.parameters()).device
        eos, pad = tok.eos_token_id, self.pad_id
        out: list[str] = []
        model.eval()
        for chunk in batched(records, self.config.task.predict_batch_size):
            rows = [
                ids[: self.config.data.max_length - 1] + ([eos] if eos is not None else [])
                for ids in tok.encode_batch([s for s, _ in chunk], add_special_tokens=False)["input_ids"]
            ]
            input_ids = torch.full((len(rows), max(map(len, rows))), pad, device=device)
            mask = torch.zeros_like(input_ids)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            with contextlib.nullcontext():
                result = generate(
                    model,
                    input_ids,
                    mask,
                    max_new_tokens=self.config.task.max_new_tokens,
                    num_beams=self.config.task.num_beams,
                )
            for row in result.tokens.tolist():
                out.append(tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True).strip())
        model.train()
        return out


class SFTTask(GenerationTask):
    name = "sft"
    head = "causal_lm"

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_sft

        features, stats = encode_sft(self.tokenizer, records, self.config.data.max_length)
        for key, value in stats.items():
            if isinstance(value, int):
                self.stats[f"{split}_{key}"] = value
        return features

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1

    def reference(self, record) -> str:
        return record.messages[-1].content

    def generate(self, model: nn.Module, records: list) -> list[str]:
        """Greedy responses to each conversation's prompt (every message but the last), rendered with the same
        chat template as training, left-padded in batches."""
        from lmforge.finetune.features import chat_renderer
        from lmforge.generate import generate

        renderer, device = chat_renderer(self.tokenizer), next(model.parameters()).device
        out: list[str] = []
        model.eval()
        for chunk in batched(records, self.config.task.predict_batch_size):
            rows = []
            for r in chunk:
                messages = [{"role": m.role, "content": m.content} for m in r.messages[:-1]]
                text = renderer.apply_chat_template(messages, add_generation_prompt=True)
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                rows.append(ids[-(self.config.data.max_length - 1) :])  # keep the end: the question is there
            width = max(map(len, rows))
            input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            configured = getattr(model.config, "eos_token_id", None)
            configured = [] if configured is None else [configured] if isinstance(configured, int) else configured
            eos = sorted(
                {*configured, *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])}
            )
            result = generate(model, input_ids, mask, max_new_tokens=self.config.task.max_new_tokens, eos_token_id=eos)
            specials = set(self.tokenizer.all_special_ids)  # the turn's end token (the tokenizer's eos) ends a reply
            for row in result.tokens.tolist():
                out.append(
                    self.tokenizer.decode([t for t in row if t not in specials], skip_special_tokens=True).strip()
                )
        model.train()
        return out


def build_task(config, tokenizer, data) -> Task:
    """The task object of `config.task.task`; labels and tags come from the training records."""
    task = config.task.task
    if task == "classification":
        labels = data.labels or tuple(sorted({label for r in data.train for label in r.labels}))
        seen = {label for r in data.train for label in r.labels}
        if data.labels:  # a catalog's label set: keep its order, but every label must be trainable
            labels = tuple(label for label in data.labels if label in seen) or tuple(sorted(seen))
        return ClassificationTask(config, tokenizer, labels, data.train)
    if task == "token-classification":  # every tag of every split gets an output; unseen ones are counted
        train_tags = {t for r in data.train for t in r.tags}
        tags = sorted(train_tags | {t for r in data.validation + (data.test or []) for t in r.tags})
        if "O" in tags:
            tags.remove("O")
            tags.insert(0, "O")
        return TaggingTask(config, tokenizer, tags, train_tags)
    if task == "qa":
        return QATask(config, tokenizer)
    if task == "seq2seq":
        return Seq2SeqTask(config, tokenizer)
    return SFTTask(config, tokenizer)
