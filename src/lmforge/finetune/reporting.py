"""Reports of fine-tuning runs: metrics.json, report.md and PNG plots in the run folder.

The headline split is the test set when there is one (scored once, at the end), else the validation set.
Classification adds ROC and precision-recall curves and the confusion matrix of that split; every run adds
its training curves (`plot_training_curves`: loss, validation metrics and learning rate against steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmforge.eval import plot_confusion, plot_pr, plot_roc, plot_training_curves, write_report


def _plots(run_dir: Path, arrays: dict | None, split: str) -> dict[str, Path]:
    plots: dict[str, Path] = {}
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        plot_training_curves(metrics_file, run_dir / "training_curves.png")
        plots["training curves"] = run_dir / "training_curves.png"
    if arrays and "probs" in arrays:
        labels, y_true, probs = arrays["labels"], arrays["y_true"], np.asarray(arrays["probs"])
        scores = probs[:, 1] if len(labels) == 2 else probs
        plot_roc(y_true, scores, labels, run_dir / f"roc_{split}.png")
        plot_pr(y_true, scores, labels, run_dir / f"pr_{split}.png")
        from lmforge.eval import confusion_matrix

        y_pred = [labels[i] for i in probs.argmax(-1)]
        plot_confusion(confusion_matrix(y_true, y_pred, labels=labels), labels, run_dir / f"confusion_{split}.png")
        plots.update(
            {
                f"ROC ({split})": run_dir / f"roc_{split}.png",
                f"precision-recall ({split})": run_dir / f"pr_{split}.png",
                f"confusion matrix ({split})": run_dir / f"confusion_{split}.png",
            }
        )
    return plots


def write_run_report(run_dir: Path, summary: dict[str, Any], val_arrays: dict | None, test_arrays: dict | None) -> Path:
    split = "test" if "test" in summary else "validation"
    arrays = test_arrays if split == "test" else val_arrays
    plots = _plots(Path(run_dir), arrays, split)
    title = f"{summary['task']}: {summary['model']} on {summary['dataset']} ({split} set)"
    details = {k: v for k, v in summary.items() if k not in ("validation", "test", "baselines")}
    if split == "test":  # the validation set chose the checkpoint; its headline numbers, for reference
        scalars = {k: v for k, v in summary["validation"].items() if isinstance(v, float)}
        details["validation"] = ", ".join(f"{k} {v:.4f}" for k, v in scalars.items())
    metrics = dict(summary[split])
    if summary.get("baselines"):  # each baseline's scores on the same split, and its fit + scoring time
        metrics["baselines"] = {
            name: {
                **{k: v for k, v in scores.get(split, {}).items() if isinstance(v, float)},
                "seconds": scores["seconds"],
            }
            for name, scores in summary["baselines"].items()
        }
        metrics["train_seconds"] = summary.get("train_seconds")
    return write_report(run_dir, metrics, title=title, plots=plots, details=details)


def write_kfold_report(run_dir: Path, summary: dict[str, Any], fold_summaries: list[dict]) -> Path:
    title = f"{summary['task']}: {summary['model']} on {summary['dataset']}, {summary['kfold']}-fold cross-validation"
    details = {k: v for k, v in summary.items() if k not in ("folds", "baselines")}
    details["fold_runs"] = [s["run_dir"] for s in fold_summaries]
    metrics = dict(summary["folds"])
    if summary.get("baselines"):
        metrics["baselines"] = summary["baselines"]
    return write_report(run_dir, metrics, title=title, details=details)
