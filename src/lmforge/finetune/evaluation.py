"""Evaluate and predict with a fine-tuned model folder (run_dir/model: weights, tokenizer, task.json).

`evaluate_saved(model_dir, data)` scores a labelled set with the task's metrics and writes metrics.json,
report.md and plots; `predict_saved(model_dir, inputs, output)` labels unlabelled inputs in batches and writes
JSONL or CSV, one row per input in input order.

Prediction inputs per task (JSONL objects, or plain text lines where one text is enough):

    classification        {"text": ..., ["text_pair": ...]}          or a line of text
    token-classification  {"tokens": [...]}                           or a line of space-separated words
    qa                    {"question": ..., "context": ..., ["id"]}  (or a SQuAD JSON file)
    seq2seq               {"source": ...}                             or a line of text
    sft                   {"prompt": ...}                             or a line of text
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lmforge.data.conll import TaggedSentence
from lmforge.data.squad import QAExample
from lmforge.data.tasks import (
    ClassificationExample,
    InstructionExample,
    Message,
    atomic_write_text,
    iter_jsonl,
    iter_lines,
)
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.recipe import TASK_FILE
from lmforge.finetune.tasks import Task, build_task


def _config(record: dict) -> FinetuneConfig:
    from lmforge.finetune.config import FINETUNE
    from lmforge.train.config import config_from_dict

    return config_from_dict(record["config"], f"{TASK_FILE}", FINETUNE)


def load_finetuned(model_dir: str | Path) -> tuple[Any, Any, Task, FinetuneConfig]:
    """(model in eval mode, tokenizer, task, the run's config) of a fine-tuned model folder or run folder."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.finetune.datasets import TaskData
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
    labels = tuple(record.get("labels") or ())
    train = _label_carriers(config.task.task, labels)
    task = build_task(config, tokenizer, TaskData(train=train, validation=[], test=None, source="", labels=labels))
    model = load_model(folder).eval()
    return model, tokenizer, task, config


def _label_carriers(task: str, labels: tuple[str, ...]) -> list:
    """Stand-in training records that carry the saved label set into `build_task`."""
    if task == "classification":
        return [ClassificationExample("", (label,)) for label in labels]
    if task == "token-classification":
        return [TaggedSentence(tuple(labels), tuple(labels))]
    return []


def evaluate_saved(model_dir: str | Path, data: str, split: str = "test", out: str | Path | None = None) -> dict:
    """Score `data` (a catalog name, whose `split` is used, or a labelled file) and write the report to `out`
    (default: model_dir/../eval-<data>)."""
    from lmforge.eval import write_report
    from lmforge.finetune.datasets import _catalog, _from_catalog, read_task_file
    from lmforge.finetune.reporting import _plots

    model, tokenizer, task, config = load_finetuned(model_dir)
    dataset = _catalog(data)
    if dataset is not None:
        splits = _from_catalog(data, dataset, config)
        if split not in splits:
            raise ValueError(f"{data} has no split {split!r}; choose one of {', '.join(splits)}")
        records = splits[split]
    else:
        records = read_task_file(data, config)
    if not records:
        raise ValueError(f"{data}: no examples to evaluate")
    features = task.encode(records, "evaluation")
    metrics, arrays = task.evaluate(model, records, features)
    out_dir = Path(out) if out else Path(model_dir).resolve().parent / f"eval-{Path(data).stem}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(out_dir, arrays, "evaluation")
    details = {"model": str(model_dir), "data": data, "split": split, "examples": len(records), "counts": task.stats}
    write_report(out_dir, metrics, title=f"{task.name}: {model_dir} on {data}", plots=plots, details=details)
    return {"out_dir": str(out_dir), "metrics": metrics, "counts": dict(task.stats)}


def read_inputs(path: str | Path, task: Task) -> list:
    """Unlabelled records of the task from a JSONL file or text lines (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    name = task.name
    if name == "qa" and path.suffix == ".json":
        from lmforge.data.squad import read_squad

        return read_squad(path).examples
    rows: list[dict | str] = []
    if path.suffix == ".jsonl":
        rows = [record for _, record in iter_jsonl(path)]
    else:
        rows = [line.rstrip("\n") for _, line in iter_lines(path) if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no inputs")
    placeholder = getattr(task, "vocab", None)
    out: list = []
    for i, row in enumerate(rows, 1):
        get = (lambda key, row=row: row.get(key)) if isinstance(row, dict) else (lambda key, row=row: row)
        if name == "classification":
            text = get("text")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i}: needs a 'text' string")
            pair = row.get("text_pair") if isinstance(row, dict) else None
            out.append(ClassificationExample(text, (placeholder.labels[0],), pair))
        elif name == "token-classification":
            tokens = row.get("tokens") if isinstance(row, dict) else row.split()
            if not isinstance(tokens, list) or not tokens:
                raise ValueError(f"{path}:{i}: needs a non-empty 'tokens' list")
            out.append(TaggedSentence(tuple(map(str, tokens)), tuple(task.tags[0] for _ in tokens)))
        elif name == "qa":
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("question", "context")):
                raise ValueError(f"{path}:{i}: needs 'question' and 'context' strings")
            out.append(QAExample(str(row.get("id", i)), row["question"], row["context"], (), is_impossible=True))
        elif name == "seq2seq":
            source = get("source")
            if not isinstance(source, str):
                raise ValueError(f"{path}:{i}: needs a 'source' string")
            out.append((task.config.data.prefix + source, ""))
        else:
            prompt = get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{i}: needs a 'prompt' string")
            out.append(InstructionExample((Message("user", prompt), Message("assistant", ""))))
    return out


def predict_saved(model_dir: str | Path, inputs: str | Path, output: str | Path) -> int:
    """Predictions for every input, written to `output` (.jsonl or .csv) atomically; returns the count."""
    model, _, task, _ = load_finetuned(model_dir)
    records = read_inputs(inputs, task)
    features = task.encode(records, "prediction") if task.name not in ("seq2seq", "sft") else []
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
    atomic_write_text(output, text)
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
