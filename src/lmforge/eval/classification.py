"""Classification metrics: accuracy, precision/recall/F1, the confusion matrix, ROC and precision-recall
curves with their areas, log loss, and `classification_report`, which gathers every metric that applies.

The conventions are scikit-learn's (the tests use it as the oracle), so numbers compare across papers:
- per class c: tp_c = #(true = c and pred = c), pred_c = #(pred = c), true_c = #(true = c) (the support);
      P_c = tp_c / pred_c,   R_c = tp_c / true_c,   F1_c = 2 tp_c / (true_c + pred_c)  (= 2 P R / (P + R)),
  and 0/0 counts as 0 (sklearn's zero_division default, without its warning).
- "macro" is the unweighted mean of P_c, R_c, F1_c over the classes (F1 is averaged, not recomputed from the
  mean P and R); "weighted" weights each class by its support; "micro" applies the formulas to tp, pred and
  true summed over the classes (single-label with every class listed: micro P = R = F1 = accuracy).
- Multi-label data is an (N, C) 0/1 indicator matrix, each column its own binary problem; accuracy is then
  the subset accuracy (every label of a row right) and "samples" averages per-row P, R, F1.
- ROC and PR curves sweep the threshold over the distinct scores (tied scores move together, one point per
  distinct value). ROC AUC is the trapezoid area under (FPR, TPR), which counts a tied positive/negative pair
  as half right. Average precision is the step-wise sum AP = sum_k (R_k - R_{k-1}) P_k, with no
  interpolation. Multiclass AUC/AP is one-vs-rest: class c's scores rank "c" against every other class.

Labels may be strings or integers (not a mix). With `labels=None` the classes are the sorted union of the
labels seen in y_true and y_pred (for scores: those in y_true); pass `labels` to fix the set and the order,
e.g. every class of a LabelVocab, so a class that never occurs still gets its (zero) row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

AVERAGES = ("macro", "micro", "weighted", "samples", None)


class UndefinedMetricError(ValueError):
    """A metric that this data cannot define, e.g. ROC AUC when y_true holds no negative example."""


# ----------------------------------------------------------------------------------------------------
# inputs


def _as_list(values: Any, name: str) -> list:
    """A 1-D sequence of labels as a list of Python values, all strings or all numbers."""
    array = np.asarray(values, dtype=object)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per example), got shape {array.shape}")
    items = [v.item() if isinstance(v, np.generic) else v for v in array.tolist()]
    kinds = {"str" if isinstance(v, str) else "number" for v in items}
    if len(kinds) > 1:
        raise ValueError(f"{name} mixes string and numeric labels; use one kind (e.g. map ids to names first)")
    return items


def _class_list(*label_lists: list, labels: Sequence | None) -> list:
    """`labels` as given, or the sorted union of the labels seen."""
    if labels is not None:
        classes = _as_list(labels, "labels")
        if len(set(classes)) != len(classes):
            raise ValueError(f"labels has duplicates: {classes}; list each class once")
        if not classes:
            raise ValueError("labels is empty; list at least one class")
        return classes
    seen = set().union(*label_lists)
    try:
        return sorted(seen)
    except TypeError:
        raise ValueError("y_true and y_pred mix string and numeric labels; use one kind") from None


def _encode(items: list, classes: list) -> np.ndarray:
    """Index of each item in `classes`, -1 for an item that is not one of them."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) for v in items], dtype=np.int64)


def _check_known(items: list, classes: list, name: str = "y_true") -> np.ndarray:
    """`_encode`, refusing items that are not in `classes`."""
    index = _encode(items, classes)
    if (index < 0).any():
        unknown = sorted({str(v) for v, i in zip(items, index, strict=True) if i < 0})
        raise ValueError(f"{name} holds labels that are not in labels: {unknown[:5]}; add them to labels")
    return index


def _check_pair(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} examples but y_pred has {len(y_pred)}; they must align")
    if len(y_true) == 0:
        raise ValueError("no examples: y_true and y_pred are empty")
    return y_true, y_pred


def _indicator(y: Any, name: str) -> np.ndarray:
    matrix = np.asarray(y)
    if not np.isin(matrix, (0, 1)).all():
        raise ValueError(f"{name} is 2-D, so it is read as a multi-label 0/1 matrix, but it holds other values")
    return matrix.astype(bool)


def _is_multilabel(y_true: Any) -> bool:
    return np.ndim(y_true) == 2


def _scores(scores: Any, n: int) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[0] != n:
        raise ValueError(f"scores must have shape (N,) or (N, C) with N={n} examples, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("scores hold NaN or inf; check the model outputs")
    return array


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


# ----------------------------------------------------------------------------------------------------
# label metrics


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of examples predicted right; for multi-label (N, C) matrices, of rows with every label right."""
    _check_pair(y_true, y_pred)
    if _is_multilabel(y_true):
        truth, pred = _indicator(y_true, "y_true"), _indicator(y_pred, "y_pred")
        if truth.shape != pred.shape:
            raise ValueError(f"y_true has shape {truth.shape} but y_pred has {pred.shape}")
        return float((truth == pred).all(axis=1).mean())
    truth, pred = _as_list(y_true, "y_true"), _as_list(y_pred, "y_pred")
    return float(np.mean([t == p for t, p in zip(truth, pred, strict=True)]))


def _class_counts(y_true: Any, y_pred: Any, labels: Sequence | None) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, tp, pred, true) per class; for multi-label, `labels` names the columns."""
    _check_pair(y_true, y_pred)
    if _is_multilabel(y_true):
        truth, pred = _indicator(y_true, "y_true"), _indicator(y_pred, "y_pred")
        if truth.shape != pred.shape:
            raise ValueError(f"y_true has shape {truth.shape} but y_pred has {pred.shape}")
        classes = list(range(truth.shape[1])) if labels is None else _as_list(labels, "labels")
        if len(classes) != truth.shape[1]:
            raise ValueError(f"labels names {len(classes)} classes but the multi-label matrix has {truth.shape[1]}")
        return classes, (truth & pred).sum(0), pred.sum(0), truth.sum(0)
    truth, pred = _as_list(y_true, "y_true"), _as_list(y_pred, "y_pred")
    classes = _class_list(truth, pred, labels=labels)
    t, p = _encode(truth, classes), _encode(pred, classes)
    k = len(classes)
    tp = np.bincount(t[(t == p) & (t >= 0)], minlength=k)
    return classes, tp, np.bincount(p[p >= 0], minlength=k), np.bincount(t[t >= 0], minlength=k)


def precision_recall_f1(
    y_true: Sequence, y_pred: Sequence, *, labels: Sequence | None = None, average: str | None = "macro"
) -> dict:
    """Precision, recall and F1 averaged as `average` says ("macro", "micro", "weighted", or "samples" for
    multi-label) as {"precision", "recall", "f1"}; `average=None` gives {class: {"precision", "recall",
    "f1", "support"}} in the order of `labels`. With `labels` given, only those classes count (sklearn's
    rule): a prediction of an unlisted class is a miss for the true class but no one's false positive."""
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not one of {AVERAGES}")
    if average == "samples":
        return _samples_average(y_true, y_pred)
    classes, tp, n_pred, n_true = _class_counts(y_true, y_pred, labels)
    if average == "micro":
        tp, n_pred, n_true = tp.sum(), n_pred.sum(), n_true.sum()
    precision, recall, f1 = _ratio(tp, n_pred), _ratio(tp, n_true), _ratio(2 * tp, n_true + n_pred)
    if average is None:
        return {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, n_true, strict=True)
        }
    if average == "weighted":
        if n_true.sum() == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        precision, recall, f1 = (np.average(v, weights=n_true) for v in (precision, recall, f1))
    return {"precision": float(np.mean(precision)), "recall": float(np.mean(recall)), "f1": float(np.mean(f1))}


def _samples_average(y_true: Any, y_pred: Any) -> dict:
    """Per-row P, R, F1 of a multi-label matrix, averaged over the rows."""
    _check_pair(y_true, y_pred)
    if not _is_multilabel(y_true):
        raise ValueError('average="samples" is for multi-label (N, C) 0/1 matrices; use "macro" or "micro"')
    truth, pred = _indicator(y_true, "y_true"), _indicator(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has shape {truth.shape} but y_pred has {pred.shape}")
    tp, n_pred, n_true = (truth & pred).sum(1), pred.sum(1), truth.sum(1)
    return {
        "precision": float(_ratio(tp, n_pred).mean()),
        "recall": float(_ratio(tp, n_true).mean()),
        "f1": float(_ratio(2 * tp, n_true + n_pred).mean()),
    }


def confusion_matrix(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class, in the order of `labels` (default: the
    sorted labels seen). Examples whose true or predicted label is not in `labels` are left out."""
    _check_pair(y_true, y_pred)
    if _is_multilabel(y_true):
        raise ValueError("confusion_matrix is for single-label data; for multi-label use precision_recall_f1")
    truth, pred = _as_list(y_true, "y_true"), _as_list(y_pred, "y_pred")
    classes = _class_list(truth, pred, labels=labels)
    t, p = _encode(truth, classes), _encode(pred, classes)
    kept = (t >= 0) & (p >= 0)
    k = len(classes)
    return np.bincount(t[kept] * k + p[kept], minlength=k * k).reshape(k, k)


# ----------------------------------------------------------------------------------------------------
# score metrics: curves and their areas


def _binary_counts(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fps, tps, thresholds): false and true positives when predicting positive for score >= threshold,
    one entry per distinct score, thresholds decreasing."""
    if positive.all() or not positive.any():
        kind = "negative" if positive.all() else "positive"
        raise UndefinedMetricError(f"the curve needs both classes, but y_true has no {kind} example")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_positive = scores[order], positive[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]  # end of each tie group
    tps = np.cumsum(sorted_positive)[last_of_value].astype(np.float64)
    fps = (last_of_value + 1) - tps
    return fps, tps, sorted_scores[last_of_value]


def _binary_target(y_true: Sequence, pos_label: Any) -> np.ndarray:
    return np.array([v == pos_label for v in _as_list(y_true, "y_true")], dtype=bool)


def roc_curve(y_true: Sequence, scores: Sequence, *, pos_label: Any = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for predicting `pos_label` when score >= threshold, one point per distinct
    score plus a first point (0, 0) at threshold +inf (sklearn's roc_curve with drop_intermediate=False)."""
    positive = _binary_target(y_true, pos_label)
    fps, tps, thresholds = _binary_counts(positive, _scores(scores, len(positive)).reshape(-1))
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def precision_recall_curve(
    y_true: Sequence, scores: Sequence, *, pos_label: Any = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) with thresholds increasing and recall decreasing; the arrays of
    precision and recall end with the conventional point (P=1, R=0) that has no threshold (as sklearn)."""
    positive = _binary_target(y_true, pos_label)
    fps, tps, thresholds = _binary_counts(positive, _scores(scores, len(positive)).reshape(-1))
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def _binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    fps, tps, _ = _binary_counts(positive, scores)
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    return float(np.trapezoid(tpr, fpr))


def _binary_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    fps, tps, _ = _binary_counts(positive, scores)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


BinaryMetric = Callable[[np.ndarray, np.ndarray], float]


def _defined(metric: BinaryMetric, positive: np.ndarray, scores: np.ndarray) -> float | None:
    """metric(positive, scores), or None where this data leaves it undefined."""
    try:
        return metric(positive, scores)
    except UndefinedMetricError:
        return None


def _one_vs_rest(
    metric: BinaryMetric,
    y_true: Sequence,
    scores: Sequence,
    labels: Sequence | None,
    average: str | None,
) -> float | dict:
    """`metric` on binary problems: 1-D scores (or two columns) rank the second class against the first;
    (N, C) scores rank each class against the rest, averaged by `average` (macro, weighted by prevalence,
    micro over all (example, class) cells, or None for {class: value}, None for a class whose curve is
    undefined). Multi-label (N, C) y_true is read column by column."""
    if average not in ("macro", "weighted", "micro", None):
        raise ValueError(f"average={average!r} is not one of ('macro', 'weighted', 'micro', None)")
    if _is_multilabel(y_true):
        onehot = _indicator(y_true, "y_true")
        classes = list(range(onehot.shape[1])) if labels is None else _as_list(labels, "labels")
        if len(classes) != onehot.shape[1]:
            raise ValueError(f"labels names {len(classes)} classes but y_true has {onehot.shape[1]} columns")
        values = _scores(scores, len(onehot))
    else:
        truth = _as_list(y_true, "y_true")
        values = _scores(scores, len(truth))
        classes = _class_list(truth, labels=labels)
        _check_known(truth, classes)
        if len(classes) < 2:
            raise UndefinedMetricError(f"y_true holds a single class {classes}; pass labels listing every class")
        if values.ndim == 1 or (values.shape[1] == 2 and len(classes) == 2):
            if len(classes) != 2:
                raise ValueError(f"1-D scores are for two classes, but there are {len(classes)}: pass (N, C) scores")
            column = values if values.ndim == 1 else values[:, 1]
            return metric(np.array([v == classes[1] for v in truth]), column)
        onehot = _encode(truth, classes)[:, None] == np.arange(len(classes))[None, :]
    if values.ndim != 2 or values.shape[1] != len(classes):
        raise ValueError(f"scores must have one column per class ({len(classes)}: {classes}), got {values.shape}")
    if average == "micro":
        return metric(onehot.reshape(-1), values.reshape(-1))
    per_class = [_defined(metric, onehot[:, i], values[:, i]) for i in range(len(classes))]
    if average is None:
        return dict(zip(classes, per_class, strict=True))
    undefined = [c for c, v in zip(classes, per_class, strict=True) if v is None]
    if undefined:
        raise UndefinedMetricError(
            f"classes {undefined} have no positive (or no negative) example in y_true, so their one-vs-rest "
            "curve is undefined; evaluate on data holding every class or drop those classes from labels"
        )
    if average == "weighted":
        return float(np.average(per_class, weights=onehot.sum(0)))
    return float(np.mean(per_class))


def roc_auc(
    y_true: Sequence, scores: Sequence, *, labels: Sequence | None = None, average: str | None = "macro"
) -> float | dict:
    """Area under the ROC curve: the probability that a random positive scores above a random negative
    (ties count one half). Binary: 1-D scores for the positive class, the second of the sorted `labels`.
    Multiclass: (N, C) scores, one column per class in `labels` order, one-vs-rest, averaged by `average`."""
    return _one_vs_rest(_binary_roc_auc, y_true, scores, labels, average)


def average_precision(
    y_true: Sequence, scores: Sequence, *, labels: Sequence | None = None, average: str | None = "macro"
) -> float | dict:
    """Area under the precision-recall curve as the step sum AP = sum_k (R_k - R_{k-1}) P_k over the
    distinct thresholds (sklearn's average_precision_score; no interpolation, which would be optimistic).
    Binary and one-vs-rest multiclass as in `roc_auc`."""
    return _one_vs_rest(_binary_average_precision, y_true, scores, labels, average)


def log_loss(y_true: Sequence, probs: Sequence, *, labels: Sequence | None = None, eps: float | None = None) -> float:
    """Mean negative log-likelihood of the true class, -mean_i log p_i[y_i], in nats. `probs` is (N, C)
    with columns in `labels` order (default: the sorted labels of y_true), or 1-D P(second class) for two
    classes. Probabilities are clipped to [eps, 1 - eps] (default: float64 machine epsilon, as sklearn) so one
    confident mistake gives a large finite loss instead of inf; they are not renormalised."""
    truth = _as_list(y_true, "y_true")
    values = _scores(probs, len(truth))
    if (values < 0).any() or (values > 1).any():
        raise ValueError("probs must be probabilities in [0, 1]; apply softmax (or sigmoid) to the logits first")
    if values.ndim == 1:
        values = np.stack([1.0 - values, values], axis=1)
    classes = _class_list(truth, labels=labels)
    if len(classes) != values.shape[1]:
        raise ValueError(
            f"probs has {values.shape[1]} columns but there are {len(classes)} classes {classes[:10]}; "
            "pass labels listing the class of each column"
        )
    index = _check_known(truth, classes)
    eps = np.finfo(np.float64).eps if eps is None else eps
    picked = np.clip(values, eps, 1 - eps)[np.arange(len(truth)), index]
    return float(-np.log(picked).mean())


# ----------------------------------------------------------------------------------------------------
# everything at once


def classification_report(
    y_true: Sequence, y_pred: Sequence, probs: Sequence | None = None, labels: Sequence | None = None
) -> dict:
    """Every metric that applies, as a JSON-ready dict:
    n_examples, accuracy, precision/recall/f1 _macro/_micro/_weighted (and _samples for multi-label),
    per_class {str(class): {precision, recall, f1, support, roc_auc?, pr_auc?}}, labels, and, for
    single-label, confusion_matrix (rows true, columns predicted, as lists). Every label of y_true and
    y_pred must be in `labels` (an unlisted one would silently drop out of the counts).
    With `probs` ((N, C) in `labels` order; 1-D = P(second class) for two classes): roc_auc and pr_auc
    (binary, or one-vs-rest macro) and, for single-label, log_loss. An area that is undefined on this data
    (a class with no example, or no negative) is None rather than a number computed on fewer classes."""
    multilabel = _is_multilabel(y_true)
    classes, *_ = _class_counts(y_true, y_pred, labels)
    if not multilabel:  # an example outside `labels` would silently drop out of every count
        _check_known(_as_list(y_true, "y_true"), classes, "y_true")
        _check_known(_as_list(y_pred, "y_pred"), classes, "y_pred")
    report: dict[str, Any] = {"n_examples": len(y_true), "accuracy": accuracy(y_true, y_pred)}
    for average in ("macro", "micro", "weighted", *(("samples",) if multilabel else ())):
        for name, value in precision_recall_f1(y_true, y_pred, labels=classes, average=average).items():
            report[f"{name}_{average}"] = value
    per_class = precision_recall_f1(y_true, y_pred, labels=classes, average=None)
    report["per_class"] = {str(c): values for c, values in per_class.items()}
    report["labels"] = classes
    if not multilabel:
        report["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=classes).tolist()
    if probs is not None:
        _add_score_metrics(report, y_true, probs, classes, multilabel)
    return report


def _add_score_metrics(report: dict, y_true: Any, probs: Any, classes: list, multilabel: bool) -> None:
    binary = not multilabel and len(classes) == 2
    for key, metric in (("roc_auc", roc_auc), ("pr_auc", average_precision)):
        try:
            report[key] = metric(y_true, probs, labels=classes)
        except UndefinedMetricError:
            report[key] = None
        if not binary:
            for c, value in metric(y_true, probs, labels=classes, average=None).items():
                report["per_class"][str(c)][key] = value
    if not multilabel:
        report["log_loss"] = log_loss(y_true, probs, labels=classes)
