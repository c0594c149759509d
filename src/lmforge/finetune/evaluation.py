"""Evaluate and predict with a fine-tuned model folder (run_dir/model: weights, tokenizer, task.json).

`evaluate_saved(model_dir, data)` scores a labelled set with the task's metrics and writes metrics.json,
report.md and plots; `predict_saved(model_dir, inputs, output)` labels unlabelled inputs in batches and writes
JSONL or CSV, one row per input in input order, the input text beside its prediction. The inputs are JSONL
objects, CSV/TSV rows, or plain text lines where one text is enough; each task's `input_record`
(`lmforge.finetune.tasks`) says which fields it reads: the ones the model was trained with (task.json's data
section, e.g. data.text_field), or the generic name ("text", "source"). Both show a progress bar on stderr when
the run had train.progress on.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.recipe import TASK_FILE
from lmforge.finetune.tasks import TASKS, Task
from lmforge.hf.resolve import ONNX_MANIFEST
from lmforge.io import write_text_atomic


def _config(record: dict) -> FinetuneConfig:
    from lmforge.finetune.config import FINETUNE
    from lmforge.train.config import config_from_dict

    return config_from_dict(record["config"], f"{TASK_FILE}", FINETUNE)


def load_finetuned(model_dir: str | Path) -> tuple[Any, Any, Task, FinetuneConfig]:
    """(model in eval mode, tokenizer, task, the run's config) of a fine-tuned model folder or run folder, or of
    its ONNX export (`lmforge export --to onnx` copies task.json; onnxruntime runs the graph)."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.load import load_model

    folder = Path(model_dir)
    if (folder / "model" / TASK_FILE).is_file():
        folder = folder / "model"
    task_file = folder / TASK_FILE
    if not task_file.is_file():
        raise FileNotFoundError(
            f"{task_file} not found: {model_dir} is not a fine-tuned model folder (lmforge finetune writes "
            "run_dir/model with task.json)"
        )
    record = json.loads(task_file.read_text(encoding="utf-8"))
    config = _config(record)
    tokenizer = load_tokenizer(folder)
    task = TASKS[config.task.task].from_saved(config, tokenizer, record)
    if (folder / ONNX_MANIFEST).is_file():  # an ONNX export of the model: onnxruntime runs it
        from lmforge.export.onnx_runtime import load_onnx_model

        return load_onnx_model(folder), tokenizer, task, config
    model = load_model(folder).eval()
    return model, tokenizer, task, config


def evaluate_saved(model_dir: str | Path, data: str, split: str = "test", out: str | Path | None = None) -> dict:
    """Score `data` (a catalog name, whose `split` is used, or a labelled file) and write the report to `out`
    (default: model_dir/../eval-<data>)."""
    from lmforge.eval import write_report
    from lmforge.finetune.datasets import catalog_dataset, catalog_splits, read_task_file
    from lmforge.finetune.reporting import _plots

    model, tokenizer, task, config = load_finetuned(model_dir)
    dataset = catalog_dataset(data)
    if dataset is not None:
        splits = catalog_splits(data, dataset, config)
        if split not in splits:
            raise ValueError(f"{data} has no split {split!r}; choose one of {', '.join(splits)}")
        records = splits[split]
    else:
        records = read_task_file(data, config)
    if not records:
        raise ValueError(f"{data}: no examples to evaluate")
    features = task.encode(records, "evaluation")
    with task.reporting_progress("evaluation"):
        metrics, arrays = task.evaluate(model, records, features)
    out_dir = Path(out) if out else Path(model_dir).resolve().parent / f"eval-{Path(data).stem}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(out_dir, arrays, "evaluation")
    details = {"model": str(model_dir), "data": data, "split": split, "examples": len(records), "counts": task.stats}
    write_report(out_dir, metrics, title=f"{task.name}: {model_dir} on {data}", plots=plots, details=details)
    return {"out_dir": str(out_dir), "metrics": metrics, "counts": dict(task.stats)}


def predict_saved(model_dir: str | Path, inputs: str | Path, output: str | Path) -> int:
    """Predictions for every input, written to `output` (.jsonl or .csv) atomically; returns the count."""
    model, _, task, _ = load_finetuned(model_dir)
    records = task.read_inputs(inputs)
    features = task.encode(records, "prediction") if task.predicts_from_features else []
    with task.reporting_progress("prediction"):
        predictions = task.predict(model, records, features)
    output = Path(output)
    if output.suffix == ".csv":
        buffer = io.StringIO()
        rows = [_flat(p) for p in predictions]
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, text)
    return len(predictions)


def _flat(prediction: dict) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in prediction.items():
        if isinstance(value, dict):
            row.update({f"p_{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            row[key] = " ".join(map(str, value))
        else:
            row[key] = value
    return row
