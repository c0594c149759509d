"""K-fold cross-validation splits and the mean ± std of metrics over the folds.

K-fold: the examples are shuffled (seeded) and cut into k folds of sizes differing by at most one; fold i is
the validation set of split i and the other k-1 folds are its training set, so every example is validated
exactly once. Stratified K-fold deals each class's (shuffled) examples round-robin over the folds, so every
fold holds each class in the proportion of the whole set (per-class counts differ by at most one between
folds) and small classes cannot land in one fold by chance. A class with fewer than k examples cannot be
in every fold; that is an error, not a silent fallback to unstratified folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import numpy as np


def _check_k(n: int, k: int) -> None:
    if k < 2:
        raise ValueError(f"k={k} folds: cross-validation needs k >= 2 (k=5 or 10 are usual)")
    if k > n:
        raise ValueError(f"k={k} folds but only {n} examples; use k <= {n}")


def _splits(fold_of: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index arrays, sorted, for fold_of[i] = the fold of example i."""
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def kfold_indices(n: int, k: int, *, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, val_idx) pairs over range(n): shuffled with `seed`, folds of n//k or n//k + 1 examples."""
    _check_k(n, k)
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % k
    return _splits(fold_of, k)


def stratified_kfold_indices(labels: Sequence, k: int, *, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, val_idx) pairs whose validation folds keep the class proportions of `labels` (one label
    per example, strings or ints): each class's count differs by at most one between folds, as do fold sizes."""
    labels = [v.item() if isinstance(v, np.generic) else v for v in labels]
    _check_k(len(labels), k)
    members: dict = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    small = {label: len(idx) for label, idx in members.items() if len(idx) < k}
    if small:
        listed = ", ".join(f"{label!r} has {count}" for label, count in sorted(small.items(), key=lambda kv: kv[1]))
        raise ValueError(
            f"stratified {k}-fold needs every class in every fold, but {listed} example(s); use k <= "
            f"{min(small.values())}, merge or drop the rare classes, or use kfold_indices"
        )
    rng = np.random.default_rng(seed)
    try:
        classes = sorted(members)
    except TypeError:
        raise ValueError("labels mix strings and numbers; use one kind") from None
    dealt = np.concatenate([rng.permutation(members[c]) for c in classes])  # class by class, shuffled within
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[dealt] = np.arange(len(labels)) % k  # round-robin over the folds, continuing across classes
    return _splits(fold_of, k)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize_folds(fold_metrics: Sequence[dict]) -> dict[str, dict]:
    """{metric: {"mean", "std", "values"}} over the numeric top-level entries of each fold's metrics.

    "values" has one entry per fold (None where the fold lacks the metric or it is NaN); mean and std are
    over the folds that have it. std is the sample standard deviation (ddof=1, the estimate papers report
    as mean ± std over folds); it is None with fewer than two values. Non-numeric entries (per-class
    tables, confusion matrices, labels) are skipped."""
    if not fold_metrics:
        raise ValueError("no folds to summarise; pass one metrics dict per fold")
    names: dict[str, None] = {}
    for metrics in fold_metrics:
        names.update((name, None) for name, value in metrics.items() if _number(value) is not None)
    summary = {}
    for name in names:
        values = [_number(metrics.get(name)) for metrics in fold_metrics]
        present = np.array([v for v in values if v is not None])
        summary[name] = {
            "mean": float(present.mean()),
            "std": float(present.std(ddof=1)) if len(present) > 1 else None,
            "values": values,
        }
    return summary
