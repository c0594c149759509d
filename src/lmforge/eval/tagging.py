"""Entity-level scores for token tagging (NER, chunking): an entity counts as found only when its type and
both boundaries match exactly (the CoNLL shared-task rule), plus token accuracy.

Entities are read from the tags as conlleval and seqeval's default mode read them, which is lenient about
malformed sequences instead of rejecting them:
- tags are `O`, or `P-TYPE` with prefix P in B (begin), I (inside), E (end, IOBES), S (single, IOBES);
- an `I-X` or `E-X` continues the entity before it only if that one is of type X and still open (it
  ended in B or I); otherwise it starts a new entity, so IOB1 (`I-X` after `O`) works, and a type change
  (`B-X I-Y`) ends one entity and starts another;
- `B-X` and `S-X` always start a new entity; an entity closes after `E-X` or `S-X`, and before `O`, `B`, `S`
  or a tag of another type.
Sentences are read separately, so no entity crosses a sentence boundary.

With tp_X the predicted X entities that exactly match a gold one, P_X = tp_X / #predicted X,
R_X = tp_X / #gold X, F1 = 2PR / (P + R) (0 where undefined); "micro" pools the counts over types,
"macro" averages the per-type scores, "weighted" weights them by gold count (the types are those in
the gold or the predictions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

PREFIXES = ("B", "I", "E", "S")


def _parse(tag: str) -> tuple[str, str]:
    """("O", "") for O; ("B", "PER") for B-PER. A bare prefix ("B") is an entity of type "_", as in seqeval."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in PREFIXES:
        raise ValueError(f"tag {tag!r} is not O or B-/I-/E-/S-TYPE; convert the tags to BIO (IOB2) or IOBES")
    return prefix, kind or "_"


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of one sentence as (type, start, end) with `end` exclusive, read by the rules above."""
    spans = []
    open_kind, start = None, 0  # the entity being read, if it can still grow
    for i, tag in enumerate(tags):
        prefix, kind = _parse(tag)
        continues = open_kind == kind and prefix in ("I", "E")
        if open_kind is not None and not continues:
            spans.append((open_kind, start, i))
            open_kind = None
        if prefix != "O" and not continues:
            open_kind, start = kind, i
        if prefix in ("E", "S") and open_kind is not None:
            spans.append((open_kind, start, i + 1))
            open_kind = None
    if open_kind is not None:
        spans.append((open_kind, start, len(tags)))
    return spans


def _check(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} sentences but y_pred has {len(y_pred)}; they must align")
    for i, (truth, pred) in enumerate(zip(y_true, y_pred, strict=True)):
        if isinstance(truth, str) or isinstance(pred, str):
            raise ValueError("y_true and y_pred are lists of tag sequences (one list of tags per sentence)")
        if len(truth) != len(pred):
            raise ValueError(f"sentence {i} has {len(truth)} gold tags but {len(pred)} predicted; one tag per token")


def _entity_counts(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """{type: [tp, predicted, gold]} over all sentences, types sorted."""
    _check(y_true, y_pred)
    tp, predicted, gold = Counter(), Counter(), Counter()
    for truth, pred in zip(y_true, y_pred, strict=True):
        gold_spans, pred_spans = set(entity_spans(truth)), set(entity_spans(pred))
        gold.update(kind for kind, _, _ in gold_spans)
        predicted.update(kind for kind, _, _ in pred_spans)
        tp.update(kind for kind, _, _ in gold_spans & pred_spans)
    return {kind: np.array([tp[kind], predicted[kind], gold[kind]]) for kind in sorted(gold | predicted)}


def _scores(tp: float, predicted: float, gold: float) -> tuple[float, float, float]:
    precision = tp / predicted if predicted else 0.0
    recall = tp / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_precision_recall_f1(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]], *, average: str | None = "micro"
) -> dict:
    """Entity-level {"precision", "recall", "f1"} averaged as `average` says ("micro", "macro", "weighted"),
    or with average=None {type: {"precision", "recall", "f1", "support"}} (support = gold entities)."""
    if average not in ("micro", "macro", "weighted", None):
        raise ValueError(f"average={average!r} is not one of ('micro', 'macro', 'weighted', None)")
    counts = _entity_counts(y_true, y_pred)
    if average == "micro":
        total = sum(counts.values(), np.zeros(3, dtype=np.int64))
        return dict(zip(("precision", "recall", "f1"), _scores(*total), strict=True))
    per_type = {kind: _scores(*c) for kind, c in counts.items()}
    if average is None:
        return {
            kind: {"precision": p, "recall": r, "f1": f, "support": int(counts[kind][2])}
            for kind, (p, r, f) in per_type.items()
        }
    if not per_type:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    table = np.array(list(per_type.values()))  # (types, 3)
    weights = np.array([c[2] for c in counts.values()], dtype=np.float64)
    if average == "weighted":
        if weights.sum() == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        means = np.average(table, axis=0, weights=weights)
    else:
        means = table.mean(axis=0)
    return dict(zip(("precision", "recall", "f1"), map(float, means), strict=True))


def token_accuracy(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> float:
    """Fraction of tokens whose tag is right, over all sentences (O tags included, so it flatters sparse data;
    report entity F1 as the headline)."""
    _check(y_true, y_pred)
    right = sum(t == p for truth, pred in zip(y_true, y_pred, strict=True) for t, p in zip(truth, pred, strict=True))
    total = sum(len(truth) for truth in y_true)
    if total == 0:
        raise ValueError("no tokens: every sentence is empty")
    return right / total


def tagging_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict:
    """precision/recall/f1 _micro/_macro/_weighted, token_accuracy, n_sentences, n_entities (gold), and
    per_class {type: {precision, recall, f1, support}}: the same layout as `classification_report`, so
    `write_report` renders both."""
    report: dict = {"n_sentences": len(y_true), "token_accuracy": token_accuracy(y_true, y_pred)}
    for average in ("micro", "macro", "weighted"):
        for name, value in entity_precision_recall_f1(y_true, y_pred, average=average).items():
            report[f"{name}_{average}"] = value
    report["per_class"] = entity_precision_recall_f1(y_true, y_pred, average=None)
    report["n_entities"] = sum(values["support"] for values in report["per_class"].values())
    return report
