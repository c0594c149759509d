"""Token classification (tagging): one tag per word, NER (BIO tags) or part of speech.

Records are `TaggedSentence`s: the catalog's token-classification sets (wsj-pos; wsj-ner-derived, a BIO proxy
built from its proper-noun runs) or a user's CoNLL column file. Prediction inputs are {"tokens": [...]}
objects or lines of space-separated words.

Loss: cross-entropy per labelled token (the first subword of each word; the others carry IGNORE_INDEX).
Metrics: entity-level precision/recall/F1 (seqeval's conventions) for BIO tags, else per-token classification
scores and token accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.readers.conll import TaggedSentence
from lmforge.finetune.tasks.base import Task, model_inputs
from lmforge.nn.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.datasets import TaskData


def tagged_sentences(rows: list[dict]) -> list[TaggedSentence]:
    """A catalog split's {"tokens": [...], "tags": [...]} rows as sentences."""
    return [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for r in rows]


class TaggingTask(Task):
    name = "token-classification"
    head = "token_classification"
    default_model = "all-MiniLM-L6-v2"

    def __init__(
        self,
        config: FinetuneConfig,
        tokenizer: Tokenizer,
        tags: Sequence[str],
        train_tags: Sequence[str] | None = None,
    ) -> None:
        super().__init__(config, tokenizer)
        self.tags = tuple(tags)
        self.train_tags = set(train_tags if train_tags is not None else tags)
        self.tag_to_id = {t: i for i, t in enumerate(self.tags)}
        self.is_bio = any(t.startswith(("B-", "I-")) for t in self.tags)

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return kind == "token-classification"

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        sentences = tagged_sentences(rows)
        if name == "wsj-ner-derived":
            from lmforge.data.corpora.derived import wsj_ner_derived

            sentences = wsj_ner_derived(sentences)
        return sentences

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        from lmforge.data.readers.conll import read_conll

        return list(read_conll(path))

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return [" ".join(r.tokens) for r in records]

    @classmethod
    def from_data(cls, config: FinetuneConfig, tokenizer: Tokenizer, data: TaskData) -> TaggingTask:
        """Every tag of every split gets an output ("O" first, the rest sorted); tags the training set lacks are
        counted in evaluation, since the model never learns to predict them."""
        train_tags = {t for r in data.train for t in r.tags}
        tags = sorted(train_tags | {t for r in data.validation + (data.test or []) for t in r.tags})
        if "O" in tags:
            tags.remove("O")
            tags.insert(0, "O")
        return cls(config, tokenizer, tags, train_tags)

    @classmethod
    def from_saved(cls, config: FinetuneConfig, tokenizer: Tokenizer, record: dict) -> TaggingTask:
        return cls(config, tokenizer, tuple(record.get("labels") or ()))

    def saved_fields(self) -> dict[str, Any]:
        return {"labels": list(self.tags)}

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
        logits = model(**model_inputs(model, batch)).logits.float()  # (B, T, n_tags)
        return F.cross_entropy(
            logits.flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=self.smoothing(model),
        )

    def word_tags(self, model: nn.Module, records: list, features: list[dict]) -> list[list[str]]:
        """The tag of each word: the prediction at its first subword; words cut off by truncation get "O" (the
        first tag when there is no "O")."""
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

    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        metrics = self.score_tags(records, self.word_tags(model, records, features))
        metrics["loss"] = self.eval_loss(model, features)
        return metrics, {}

    def score_tags(self, records: list, predicted: list[list[str]]) -> dict:
        """The metrics of predicted word tags against the records' tags: what `evaluate` reports for the model,
        and for a baseline on the same sentences."""
        from lmforge.eval import classification_report, tagging_report, token_accuracy

        gold = [list(r.tags) for r in records]
        if self.is_bio:  # entity-level scores (seqeval's conventions) are the headline for BIO tags
            metrics = tagging_report(gold, predicted)
            metrics.update({f"entity_{k}": v for k, v in list(metrics.items()) if k.startswith("f1_")})
        else:  # per-token tags (POS): every token is one classification
            flat_true = [t for s in gold for t in s]
            flat_pred = [t for s in predicted for t in s]
            metrics = classification_report(flat_true, flat_pred, labels=list(self.tags))
            metrics["token_accuracy"] = token_accuracy(gold, predicted)
        return metrics

    def predict(self, model: nn.Module, records: list, features: list[dict]) -> list[dict]:
        return [
            {"tokens": list(r.tokens), "tags": t}
            for r, t in zip(records, self.word_tags(model, records, features), strict=True)
        ]

    def input_record(self, row: dict | str, number: int) -> TaggedSentence:
        """{"tokens": [...]} or a line of space-separated words; the tags are placeholders, never read."""
        tokens = row.get("tokens") if isinstance(row, dict) else row.split()
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("needs a non-empty 'tokens' list")
        return TaggedSentence(tuple(map(str, tokens)), tuple(self.tags[0] for _ in tokens))
