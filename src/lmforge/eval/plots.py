"""Evaluation plots as PNG files: ROC and precision-recall curves, the confusion matrix, training curves, and
`read_metrics`, the reader of the metrics.jsonl a training run writes (`lmforge.train.logging.MetricsLogger`).

Figures are drawn on matplotlib's Agg canvas directly, so they work without a display and never change
pyplot's global backend. Each file is written to a temporary name beside its target and renamed over it, so
a crash never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmforge.eval.classification import (
    average_precision,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)
from lmforge.io import atomic_path

ANNOTATE_MAX_CLASSES = 30  # beyond this the cell numbers are too small to read


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    return path


def _binary_columns(y_true: Sequence, scores: Sequence, labels: Sequence | None) -> list[tuple[str, list, np.ndarray]]:
    """(name, binary targets, scores) per curve to draw: one for two classes, one per class otherwise
    (skipping a class that has no example, or is every example, since its curve is undefined)."""
    truth = list(np.asarray(y_true, dtype=object))
    values = np.asarray(scores, dtype=np.float64)
    classes = list(labels) if labels is not None else sorted(set(truth))
    if values.ndim == 1 or (values.shape[1] == 2 and len(classes) == 2):
        if len(classes) != 2:
            raise ValueError(f"1-D scores are for two classes, but labels has {len(classes)}: pass (N, C) scores")
        column = values if values.ndim == 1 else values[:, 1]
        return [(str(classes[1]), [t == classes[1] for t in truth], column)]
    if values.shape[1] != len(classes):
        raise ValueError(f"scores has {values.shape[1]} columns but labels names {len(classes)} classes")
    curves = []
    for i, c in enumerate(classes):
        target = [t == c for t in truth]
        if 0 < sum(target) < len(target):
            curves.append((str(c), target, values[:, i]))
    if not curves:
        raise ValueError("no class has both positive and negative examples in y_true; nothing to plot")
    return curves


def plot_roc(y_true: Sequence, scores: Sequence, labels: Sequence | None, path: str | os.PathLike) -> Path:
    """ROC curve(s) with the AUC in the legend: binary (1-D scores for labels[1]) or one-vs-rest per class
    ((N, C) scores in `labels` order). Returns the PNG path."""
    figure = _figure(6, 5)
    axes = figure.subplots()
    for name, target, column in _binary_columns(y_true, scores, labels):
        fpr, tpr, _ = roc_curve(target, column, pos_label=True)
        axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(target, column, labels=[False, True]):.3f})")
    axes.plot([0, 1], [0, 1], color="tab:gray", linestyle="--", linewidth=1, label="chance")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("ROC" if len(axes.lines) == 2 else "ROC, one class vs the rest")
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_pr(y_true: Sequence, scores: Sequence, labels: Sequence | None, path: str | os.PathLike) -> Path:
    """Precision-recall curve(s) (steps, as average precision integrates them) with AP in the legend;
    binary or one-vs-rest as `plot_roc`. Returns the PNG path."""
    figure = _figure(6, 5)
    axes = figure.subplots()
    curves = _binary_columns(y_true, scores, labels)
    for name, target, column in curves:
        precision, recall, _ = precision_recall_curve(target, column, pos_label=True)
        ap = average_precision(target, column, labels=[False, True])
        axes.step(recall, precision, where="post", label=f"{name} (AP {ap:.3f})")
    if len(curves) == 1:
        prevalence = float(np.mean(curves[0][1]))
        axes.axhline(prevalence, color="tab:gray", linestyle="--", linewidth=1, label="chance (prevalence)")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("Precision-recall" if len(curves) == 1 else "Precision-recall, one class vs the rest")
    axes.legend(loc="lower left", fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_confusion(
    matrix: Sequence[Sequence[float]], labels: Sequence, path: str | os.PathLike, normalize: bool = False
) -> Path:
    """The confusion matrix as a heat map, rows = true class, columns = predicted, each cell annotated with
    its count (normalize=True: its share of the true class's row, so each row sums to 1)."""
    counts = np.asarray(matrix, dtype=np.float64)
    k = len(labels)
    if counts.shape != (k, k):
        raise ValueError(f"matrix has shape {counts.shape} but labels names {k} classes; expected ({k}, {k})")
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    size = min(max(4.0, 0.6 * k + 2), 20.0)
    figure = _figure(size + 1, size)
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    figure.colorbar(image, ax=axes, shrink=0.8)
    names = [str(label) for label in labels]
    axes.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    axes.set_yticks(range(k), names)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if k <= ANNOTATE_MAX_CLASSES:
        threshold = shown.max() / 2
        for i in range(k):
            for j in range(k):
                text = f"{shown[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
                color = "white" if shown[i, j] > threshold else "black"
                axes.text(j, i, text, ha="center", va="center", color=color, fontsize="small")
    return _save(figure, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The events of a metrics.jsonl ({"step", "split", "time", <metric>: value} per line), skipping lines that
    are not complete JSON objects with an integer step (a run killed mid-write leaves a partial last line)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def plot_training_curves(metrics_jsonl_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """The curves of a training run (pretraining or fine-tuning) against steps, from its metrics.jsonl, in up to
    three stacked panels sharing the step axis: loss (train and every evaluated split), every other metric of
    the evaluated splits (accuracy, perplexity, ...), and the train learning rate. Panels with nothing logged
    are left out; train-only diagnostics (tokens/s, gradient norm, MFU) are TensorBoard's."""
    metrics_jsonl_path = Path(metrics_jsonl_path)
    if not metrics_jsonl_path.is_file():
        raise FileNotFoundError(f"{metrics_jsonl_path} not found; a training run writes it as run_dir/metrics.jsonl")
    losses: dict[str, tuple[list, list]] = {}
    eval_metrics: dict[str, tuple[list, list]] = {}
    learning_rate: dict[str, tuple[list, list]] = {}
    for record in read_metrics(metrics_jsonl_path):
        split = record.get("split", "train")
        for name, value in record.items():
            if name in ("step", "split", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if name == "loss":
                target = losses.setdefault(split, ([], []))
            elif split != "train":
                target = eval_metrics.setdefault(f"{split} {name}", ([], []))
            elif name == "lr":
                target = learning_rate.setdefault(split, ([], []))
            else:
                continue
            target[0].append(record["step"])
            target[1].append(value)
    if not losses and not eval_metrics:
        raise ValueError(f"{metrics_jsonl_path} has no loss or validation metrics to plot")
    panels = [
        (curves, ylabel, height)
        for curves, ylabel, height in (
            (losses, "loss", 3.5),
            (eval_metrics, "metric", 3.5),
            (learning_rate, "learning rate", 2.0),
        )
        if curves
    ]
    heights = [height for _, _, height in panels]
    figure = _figure(8, sum(heights) + 0.5)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (curves, ylabel, _) in zip(axes, panels, strict=True):
        for name, (steps, values) in sorted(curves.items(), key=lambda kv: kv[0] != "train"):
            ax.plot(steps, values, label=name, marker="o" if name != "train" and len(steps) < 30 else None)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save(figure, path)
