"""Reports and plots: metrics.json parses (NaN-safe, sorted), report.md shows every section that applies,
every plot is a real PNG, and nothing half-written is left behind."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from lmforge.eval import (
    classification_report,
    plot_confusion,
    plot_pr,
    plot_roc,
    plot_training_curves,
    read_metrics,
    summarize_folds,
    tagging_report,
    write_report,
)
from lmforge.train.logging import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(0)
    labels = ["neg", "neutral", "pos"]
    y_true = np.array(labels)[rng.integers(0, 3, 120)]
    logits = rng.normal(size=(120, 3)) + 2.0 * (np.array(labels)[None, :] == y_true[:, None])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probs, labels


def test_plots_are_valid_pngs(tmp_path, multiclass):
    y_true, probs, labels = multiclass
    report = classification_report(y_true, np.array(labels)[probs.argmax(1)], probs=probs, labels=labels)
    paths = [
        plot_roc(y_true, probs, labels, tmp_path / "roc.png"),
        plot_pr(y_true, probs, labels, tmp_path / "pr.png"),
        plot_roc(y_true == "pos", probs[:, 2], [False, True], tmp_path / "roc_binary.png"),
        plot_pr(y_true == "pos", probs[:, 2], [False, True], tmp_path / "pr_binary.png"),
        plot_confusion(report["confusion_matrix"], labels, tmp_path / "confusion.png"),
        plot_confusion(report["confusion_matrix"], labels, tmp_path / "sub" / "confusion_norm.png", normalize=True),
    ]
    for path in paths:
        _assert_png(path)
    assert _leftovers(tmp_path) == []


def _pretraining_metrics(run_dir):
    """What the pretraining recipe logs: train loss, lr and throughput; val loss, perplexity and bits per byte."""
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, 41):
            logger.log(step, {"loss": 5.0 / step, "lr": 1e-3 * min(step / 10, 1), "tokens_per_s": 1e4, "mfu": 0.3})
            if step % 10 == 0:
                loss = 6.0 / step
                logger.log(
                    step, {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2)}, "val"
                )
    return run_dir / "metrics.jsonl"


def _finetuning_metrics(run_dir):
    """What a fine-tuning run logs: train loss, lr, grad norm; validation loss and task metrics."""
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, 21):
            logger.log(step, {"loss": 3.0 / step, "lr": 1e-3, "grad_norm": float("nan")})
            if step % 5 == 0:
                logger.log(step, {"loss": 3.5 / step, "accuracy": step / 25, "f1_macro": step / 30}, split="val")
    return run_dir / "metrics.jsonl"


def _height(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] == 8 * 120
        return image.size[1]


def test_training_curves_plot_pretraining_and_finetuning_runs(tmp_path):
    """One plotter for every recipe: loss, evaluation metrics and learning rate, each panel only when logged
    (the figure is 120 dpi, 8 inches wide, 3.5 inches per loss/metric panel, 2 for the lr panel, + 0.5)."""
    pretraining = _pretraining_metrics(tmp_path / "pretrain")
    finetuning = _finetuning_metrics(tmp_path / "finetune")
    _assert_png(plot_training_curves(pretraining, tmp_path / "pretrain" / "loss.png"))
    _assert_png(plot_training_curves(finetuning, tmp_path / "finetune" / "training_curves.png"))
    assert _height(tmp_path / "pretrain" / "loss.png") == _height(tmp_path / "finetune" / "training_curves.png")
    assert _height(tmp_path / "pretrain" / "loss.png") == (3.5 + 3.5 + 2 + 0.5) * 120

    train_only = tmp_path / "train_only.jsonl"
    train_only.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "train", "loss": 1.0}\n')
    assert _height(plot_training_curves(train_only, tmp_path / "one_panel.png")) == (3.5 + 0.5) * 120
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "pretrain") == []

    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_training_curves(tmp_path / "missing" / "metrics.jsonl", tmp_path / "x.png")
    (tmp_path / "lr_only.jsonl").write_text('{"step": 1, "split": "train", "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no loss or validation metrics"):
        plot_training_curves(tmp_path / "lr_only.jsonl", tmp_path / "x.png")


def test_read_metrics_skips_partial_and_foreign_lines(tmp_path):
    path = _finetuning_metrics(tmp_path)
    with path.open("a") as f:
        f.write('["not", "an", "event"]\n{"split": "val"}\n{"step": 21, "split": "tr')
    records = read_metrics(path)
    assert len(records) == 24 and (records[-1]["step"], records[-1]["split"]) == (20, "val")
    assert records[0]["grad_norm"] is None  # NaN is logged as null


def test_pretraining_report_is_summary_json_and_markdown(tmp_path):
    """The same writer as the evaluation report, under the file names the pretraining run folder uses."""
    plot = plot_training_curves(_pretraining_metrics(tmp_path), tmp_path / "loss.png")
    summary = {
        "run_dir": str(tmp_path),
        "model": "gpt-tiny",
        "steps": 40,
        "stopped_by": None,
        "best_val_loss": 0.15,
        "final_val": {"loss": 0.15, "perplexity": math.exp(0.15)},
        "skipped_steps": 0,
        "grad_norm": float("nan"),
    }
    path = write_report(
        tmp_path,
        summary,
        title="Pretraining gpt-tiny on tiny",
        plots={"training curves": plot},
        json_name="summary.json",
        markdown_name="summary.md",
    )
    assert path == tmp_path / "summary.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl", "summary.json", "summary.md"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {**summary, "grad_norm": None}
    report = path.read_text()
    assert report.startswith("# Pretraining gpt-tiny on tiny\n")
    assert "| steps | 40 |" in report and "| model | gpt-tiny |" in report and "| stopped_by | n/a |" in report
    assert "| best_val_loss | 0.1500 |" in report and f"| final_val perplexity | {math.exp(0.15):.4f} |" in report
    assert "![training curves](loss.png)" in report


def test_report_has_metrics_per_class_confusion_and_plots(tmp_path, multiclass):
    y_true, probs, labels = multiclass
    metrics = classification_report(y_true, np.array(labels)[probs.argmax(1)], probs=probs, labels=labels)
    metrics["perplexity"] = float("inf")  # not JSON: must become null
    metrics["rouge"] = {"rouge1": {"f1": 0.5}, "rougeL": 0.25}
    roc = plot_roc(y_true, probs, labels, tmp_path / "roc.png")
    path = write_report(
        tmp_path, metrics, title="Sentiment: eval", plots={"ROC": roc}, details={"model": "gpt-tiny", "seed": 3}
    )
    assert path == tmp_path / "report.md"
    text = (tmp_path / "metrics.json").read_text()
    saved = json.loads(text)
    assert list(saved) == sorted(saved) and saved["perplexity"] is None
    assert saved["accuracy"] == pytest.approx(metrics["accuracy"])
    assert saved["confusion_matrix"] == metrics["confusion_matrix"]
    report = path.read_text()
    assert report.startswith("# Sentiment: eval\n")
    assert "| model | gpt-tiny |" in report
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in report
    assert "| perplexity | n/a |" in report
    assert "| rouge rougeL | 0.2500 |" in report
    assert "## Per class" in report and "| neutral |" in report and "roc_auc" in report
    row = metrics["confusion_matrix"][0]
    assert "| true \\ predicted | neg | neutral | pos |" in report
    assert f"| neg | {row[0]} | {row[1]} | {row[2]} |" in report
    assert "![ROC](roc.png)" in report
    assert "Cross-validation" not in report
    assert _leftovers(tmp_path) == []


def test_report_shows_kfold_mean_and_std(tmp_path):
    folds = [{"accuracy": a, "f1_macro": a - 0.1, "labels": ["x"]} for a in (0.8, 0.9, 0.85)]
    summary = summarize_folds(folds)
    path = write_report(tmp_path / "cv", {"kfold": summary, "k": 3}, title="3-fold")
    report = path.read_text()
    assert "## Cross-validation (3 folds)" in report
    assert f"| accuracy | 0.8500 ± {np.std([0.8, 0.9, 0.85], ddof=1):.4f} | 0.8000, 0.9000, 0.8500 |" in report
    assert json.loads((tmp_path / "cv" / "metrics.json").read_text())["kfold"]["accuracy"]["values"] == [0.8, 0.9, 0.85]


def test_tagging_report_renders_per_type_table(tmp_path):
    metrics = tagging_report([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])
    report = write_report(tmp_path, metrics, title="NER").read_text()
    assert "| PER | 1.0000 | 1.0000 | 1.0000 | 1 |" in report
    assert "| LOC | 0.0000 | 0.0000 | 0.0000 | 1 |" in report


def test_plot_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        plot_confusion([[1, 2, 3]], ["a", "b"], tmp_path / "c.png")
    with pytest.raises(ValueError, match="3 columns but labels names 2"):
        plot_roc(["a", "b", "c"], np.eye(3), ["a", "b"], tmp_path / "r.png")
