"""Baselines trained and scored beside a fine-tuning run, on exactly its splits (or K-fold folds).

A number means little alone: 0.80 accuracy is good if a bag of words gets 0.72 and poor if it gets 0.85. With
`--baseline tfidf,lstm` the recipe fits each named baseline on the run's training records (augmented ones
included, the same records the model saw), scores it on the run's validation and test records with the task's
own scorer (`ClassificationTask.score`, `TaggingTask.score_tags`), and reports it beside the model in
metrics.json ("baselines") and report.md; with K-fold, on every fold, summarised as mean ± std.

One object per baseline (`BASELINES`), each naming the tasks it exists for:
- tfidf (classification): TF-IDF of word 1-2 grams (sublinear tf) + logistic regression (scikit-learn), the
  classic strong linear text classifier (Wang & Manning, 2012 compare such baselines on these sentences).
- frozen-lr (classification): the task's pretrained encoder (all-MiniLM-L6-v2) frozen, each text's mean-pooled
  last hidden states (the sentence-transformers pooling) as features + logistic regression: what fine-tuning
  adds over the pretrained features (the "feature extraction" row of Devlin et al., 2019, table 7).
- lstm (classification, token-classification): a recurrent model trained from scratch by this same recipe:
  lstm-seed (the seed's Keras LSTM) for sentences, bilstm (a BiLSTM tagger) for tags.
- most-frequent-tag (token-classification): each word's most frequent training tag (lower-cased), unknown
  words the most frequent tag overall: the floor every POS tagger is measured against (Charniak et al.,
  1993 report ~90% on the WSJ with the full treebank). TF-IDF has no meaning per token, so it is not offered.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.tasks.base import Task

# train_model(preset, settings) -> the recipe's run summary of that preset on the run's own data; settings are
# dotted config fields ("optim.lr": 2e-3, ...)
TrainModel = Callable[[str, dict[str, Any]], dict]


class Baseline(ABC):
    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]
    description: ClassVar[str]

    def check(self, config: FinetuneConfig) -> None:  # noqa: B027 (optional: most need no check)
        """Refuse, before the run trains anything, a config this baseline cannot serve."""

    @abstractmethod
    def fit_score(self, task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict[str, dict]:
        """{split: metrics} of the baseline fitted on `train`, for each split of `splits`."""


def single_label(config: FinetuneConfig, name: str) -> None:
    if config.data.multi_label:
        raise ValueError(f"baseline {name!r} scores single-label classification; drop it or data.multi_label")


def class_probabilities(classifier: Any, x: Any, labels: tuple[str, ...]) -> np.ndarray:
    """(N, K) probabilities over the task's label order from a fitted scikit-learn classifier (labels it never
    saw in training get probability 0)."""
    probs = np.zeros((x.shape[0], len(labels)))
    seen = classifier.predict_proba(x)
    for j, label in enumerate(classifier.classes_):
        probs[:, labels.index(label)] = seen[:, j]
    return probs


class TfidfBaseline(Baseline):
    name = "tfidf"
    tasks = ("classification",)
    description = "TF-IDF word 1-2 grams + logistic regression (scikit-learn)"

    def check(self, config: FinetuneConfig) -> None:
        single_label(config, self.name)

    def fit_score(self, task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict[str, dict]:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = vectorizer.fit_transform(task.texts(train))
        classifier = LogisticRegression(C=10.0, max_iter=2000).fit(x, [r.label for r in train])
        labels = task.vocab.labels
        return {
            split: task.score(
                records, class_probabilities(classifier, vectorizer.transform(task.texts(records)), labels)
            )[0]
            for split, records in splits.items()
        }


class FrozenEncoderBaseline(Baseline):
    name = "frozen-lr"
    tasks = ("classification",)
    description = "frozen all-MiniLM-L6-v2, mean-pooled embeddings + logistic regression (scikit-learn)"
    batch_size = 64

    def __init__(self) -> None:
        # the encoder is frozen, so a text's features depend on the text alone: K folds embed each text once
        self.cache: dict[tuple[str, int, str], np.ndarray] = {}

    def check(self, config: FinetuneConfig) -> None:
        single_label(config, self.name)

    def embed(self, model: Any, tokenizer: Any, texts: list[str], max_length: int, key: str) -> np.ndarray:
        """Mean of the last hidden states over each text's real tokens, (N, d); each distinct text once."""
        todo = list(dict.fromkeys(t for t in texts if (key, max_length, t) not in self.cache))
        for text, row in zip(todo, self.encode(model, tokenizer, todo, max_length), strict=True):
            self.cache[key, max_length, text] = row
        return np.stack([self.cache[key, max_length, t] for t in texts])

    def encode(self, model: Any, tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
        import torch

        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer.encode_batch(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                h = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                keep = batch["attention_mask"][..., None].to(h.dtype)
                rows.append(((h * keep).sum(1) / keep.sum(1)).float().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)

    def fit_score(self, task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict[str, dict]:
        from sklearn.linear_model import LogisticRegression

        from lmforge.data.tokenizers.tokenizer import load_tokenizer
        from lmforge.hf.load import load_model
        from lmforge.hf.resolve import resolve_model

        path = resolve_model(type(task).default_model).path
        model, tokenizer = load_model(path, head="none").eval(), load_tokenizer(path)
        length, key = task.config.data.max_length, str(path)
        x = self.embed(model, tokenizer, task.texts(train), length, key)
        classifier = LogisticRegression(C=1.0, max_iter=5000).fit(x, [r.label for r in train])
        labels = task.vocab.labels
        return {
            split: task.score(
                records,
                class_probabilities(classifier, self.embed(model, tokenizer, task.texts(records), length, key), labels),
            )[0]
            for split, records in splits.items()
        }


class RecurrentBaseline(Baseline):
    name = "lstm"
    tasks = ("classification", "token-classification")
    description = "lstm-seed (sentences) or bilstm (tags) trained from scratch by this recipe"
    presets = {"classification": "lstm-seed", "token-classification": "bilstm"}
    # from scratch a recurrent model wants a larger step and more passes than a pretrained Transformer
    settings = {"optim.lr": 2e-3, "optim.warmup_steps": 0, "task.epochs": 4.0, "model.vocab_size": 8000}

    def fit_score(self, task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict[str, dict]:
        summary = train_model(self.presets[task.name], self.settings)
        return {split: summary[split] for split in splits if split in summary}


class MostFrequentTagBaseline(Baseline):
    name = "most-frequent-tag"
    tasks = ("token-classification",)
    description = "each word's most frequent training tag; unknown words: the most frequent tag"

    def fit_score(self, task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict[str, dict]:
        by_word: dict[str, Counter] = {}
        for sentence in train:
            for token, tag in zip(sentence.tokens, sentence.tags, strict=True):
                by_word.setdefault(token.lower(), Counter())[tag] += 1
        overall = Counter(tag for s in train for tag in s.tags).most_common(1)[0][0]
        best = {word: counts.most_common(1)[0][0] for word, counts in by_word.items()}
        return {
            split: task.score_tags(records, [[best.get(t.lower(), overall) for t in r.tokens] for r in records])
            for split, records in splits.items()
        }


BASELINES: dict[str, Baseline] = {
    b.name: b for b in (TfidfBaseline(), FrozenEncoderBaseline(), RecurrentBaseline(), MostFrequentTagBaseline())
}


def baseline_names(spec: str, task: str) -> list[str]:
    """The baselines of `spec` ("tfidf,lstm"), each checked to exist for `task`."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    valid = [name for name, b in BASELINES.items() if task in b.tasks]
    for name in names:
        if name not in valid:
            what = "does not exist" if name not in BASELINES else f"does not exist for task {task!r}"
            options = ", ".join(valid) or "none"
            raise ValueError(f"baseline {name!r} {what}; {task} baselines: {options}")
    return list(dict.fromkeys(names))


def run_baselines(names: list[str], task: Task, train: list, splits: dict[str, list], train_model: TrainModel) -> dict:
    """{name: {split: metrics, "seconds": fit and scoring time}} of each baseline on the run's records."""
    out = {}
    for name in names:
        start = time.perf_counter()
        scores = BASELINES[name].fit_score(task, train, splits, train_model)
        out[name] = {**scores, "seconds": time.perf_counter() - start}
    return out
