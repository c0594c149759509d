"""The report of a run on disk, one writer for every recipe: a JSON file for programs and a Markdown file for
people. Fine-tuning and evaluation write metrics.json + report.md, pretraining summary.json + summary.md.

The JSON holds the metrics dict as given, with sorted keys and every NaN or infinity written as null
(JSON has no NaN), numpy values turned into plain numbers and lists. The Markdown shows, when present:
the run details, the headline metrics, a per-class table (`per_class`, as written by
`classification_report` and `tagging_report`), the confusion matrix (`confusion_matrix` with `labels`),
a K-fold table of mean ± std (entries shaped like `summarize_folds`' output, at the top level or under one
key), a table of the run beside its baselines (`baselines`: name -> metrics, the run's own time from
`train_seconds`), and links to the plots.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.io import write_text_atomic

PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support", "roc_auc", "pr_auc")
# the headline scores a run is compared with its baselines by (every score stays in the JSON)
BASELINE_COLUMNS = ("accuracy", "token_accuracy", "f1_macro", "f1_micro", "roc_auc", "seconds")


def to_jsonable(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python numbers and lists, tuples as lists, paths as strings,
    dict keys as strings, and NaN/inf as None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _is_fold_summary(value: Any) -> bool:
    return isinstance(value, Mapping) and {"mean", "std", "values"} <= set(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, np.generic))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _headline_rows(metrics: Mapping) -> list[list[Any]]:
    """Scalar entries, and the scalar leaves of small nested dicts (e.g. rouge1 -> f1) as "rouge1 f1"."""
    rows = []
    for name, value in metrics.items():
        if name in ("per_class", "confusion_matrix", "labels", "baselines") or _is_fold_summary(value):
            continue
        if _is_scalar(value):
            rows.append([name, value])
        elif isinstance(value, Mapping) and not all(_is_fold_summary(v) for v in value.values()):
            rows += [[f"{name} {k}", v] for k, v in value.items() if _is_scalar(v)]
    return rows


def _fold_summaries(metrics: Mapping) -> dict[str, Mapping]:
    summaries = {name: value for name, value in metrics.items() if _is_fold_summary(value)}
    for value in metrics.values():
        if isinstance(value, Mapping) and value and all(_is_fold_summary(v) for v in value.values()):
            summaries.update(value)
    return summaries


def _fold_row(name: str, summary: Mapping) -> list[str]:
    mean, std = summary["mean"], summary["std"]
    spread = f"{_cell(mean)} ± {_cell(std)}" if std is not None else _cell(mean)
    return [name, spread, ", ".join(_cell(v) for v in summary["values"])]


def _baselines_section(metrics: Mapping, baselines: Mapping) -> str:
    """The run beside its baselines: one row each, the metrics they share (mean ± std for K-fold summaries)."""
    columns: dict[str, None] = {}
    for scores in baselines.values():
        columns.update(
            (k, None) for k in BASELINE_COLUMNS if _is_scalar(scores.get(k)) or _is_fold_summary(scores.get(k))
        )

    def cell(value: Any) -> str:
        if _is_fold_summary(value):
            return _fold_row("", value)[1]
        return _cell(value) if value is not None else ""

    own = {**metrics, "seconds": metrics.get("train_seconds")}  # the run's own time is its training time
    rows = [["this run", *(cell(own.get(c)) for c in columns)]]
    rows += [[name, *(cell(scores.get(c)) for c in columns)] for name, scores in baselines.items()]
    return (
        "## Baselines\n\nFitted on the same training records and scored on the same held-out records "
        "(seconds: a baseline's fit and scoring time).\n\n" + _table(["model", *columns], rows)
    )


def _link(path: Path, out_dir: Path) -> str:
    """`path` relative to out_dir: absolute paths and paths under out_dir are rebased, other relative
    paths are taken as already relative to out_dir."""
    if path.is_absolute():
        path = Path(os.path.relpath(path, out_dir.resolve()))
    elif path.is_relative_to(out_dir):
        path = path.relative_to(out_dir)
    return path.as_posix()


def _markdown(metrics: Mapping, title: str, plots: Mapping, details: Mapping | None, out_dir: Path) -> str:
    parts = [f"# {title}\n"]
    if details:
        parts.append("## Run\n\n" + _table(["", ""], [[k, v] for k, v in details.items()]))
    headline = _headline_rows(metrics)
    if headline:
        parts.append("## Metrics\n\n" + _table(["metric", "value"], headline))
    per_class = metrics.get("per_class")
    if isinstance(per_class, Mapping) and per_class:
        columns = [c for c in PER_CLASS_COLUMNS if any(c in row for row in per_class.values())]
        rows = [[name, *(row.get(c) for c in columns)] for name, row in per_class.items()]
        parts.append("## Per class\n\n" + _table(["class", *columns], rows))
    matrix, labels = metrics.get("confusion_matrix"), metrics.get("labels")
    if matrix is not None and labels is not None:
        rows = [[label, *counts] for label, counts in zip(labels, to_jsonable(matrix), strict=True)]
        parts.append(
            "## Confusion matrix\n\nRows are the true class, columns the predicted one.\n\n"
            + _table(["true \\ predicted", *labels], rows)
        )
    baselines = metrics.get("baselines")
    if isinstance(baselines, Mapping) and baselines:
        parts.append(_baselines_section(metrics, baselines))
    folds = _fold_summaries(metrics)
    if folds:
        n_folds = max(len(s["values"]) for s in folds.values())
        parts.append(
            f"## Cross-validation ({n_folds} folds)\n\nMean ± sample standard deviation (ddof=1) over the folds.\n\n"
            + _table(["metric", "mean ± std", "per fold"], [_fold_row(n, s) for n, s in folds.items()])
        )
    if plots:
        links = []
        for name, path in plots.items():
            links.append(f"### {name}\n\n![{name}]({_link(Path(path), out_dir)})\n")
        parts.append("## Plots\n\n" + "\n".join(links))
    return "\n".join(parts)


def write_report(
    out_dir: str | os.PathLike,
    metrics: Mapping,
    *,
    title: str,
    plots: Mapping[str, str | os.PathLike] | None = None,
    details: Mapping | None = None,
    json_name: str = "metrics.json",
    markdown_name: str = "report.md",
) -> Path:
    """Write out_dir/`json_name` and out_dir/`markdown_name` (both atomically); returns the Markdown path.
    `plots` maps a caption to a PNG path (best inside out_dir; links are relative to it); `details` (model,
    data, settings) is shown as a table at the top of the report and is not part of the JSON."""
    out_dir = Path(out_dir)
    data = to_jsonable(metrics)
    write_text_atomic(out_dir / json_name, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")
    report_path = out_dir / markdown_name
    write_text_atomic(report_path, _markdown(data, title, plots or {}, details, out_dir))
    return report_path
