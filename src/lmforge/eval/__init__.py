"""Evaluation: metrics checked against their reference libraries, K-fold splits, plots and reports.

- classification: accuracy, precision/recall/F1 (macro, micro, weighted, samples), confusion matrix,
  ROC/PR curves and areas, log loss, `classification_report` (sklearn's conventions)
- tagging: entity-level P/R/F1 and token accuracy for BIO/IOB1/IOBES tags (seqeval's default mode)
- text: corpus BLEU and chrF (sacreBLEU), ROUGE (rouge-score), SQuAD exact match and F1, perplexity
- kfold: plain and stratified K-fold splits, mean ± std over folds
- plots, report: PNG figures (training curves from a run's metrics.jsonl too) and the one run report
  (metrics.json + report.md, or summary.json + summary.md for pretraining)
"""

from lmforge.eval.classification import (
    UndefinedMetricError,
    accuracy,
    average_precision,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_f1,
    roc_auc,
    roc_curve,
)
from lmforge.eval.kfold import kfold_indices, stratified_kfold_indices, summarize_folds
from lmforge.eval.plots import plot_confusion, plot_pr, plot_roc, plot_training_curves, read_metrics
from lmforge.eval.report import to_jsonable, write_report
from lmforge.eval.tagging import entity_precision_recall_f1, entity_spans, tagging_report, token_accuracy
from lmforge.eval.text import (
    bleu,
    chrf,
    normalize_answer,
    perplexity,
    rouge,
    squad_exact_match,
    squad_f1,
    tokenize_13a,
)

__all__ = [
    "UndefinedMetricError",
    "accuracy",
    "average_precision",
    "bleu",
    "chrf",
    "classification_report",
    "confusion_matrix",
    "entity_precision_recall_f1",
    "entity_spans",
    "kfold_indices",
    "log_loss",
    "normalize_answer",
    "perplexity",
    "plot_confusion",
    "plot_pr",
    "plot_roc",
    "plot_training_curves",
    "precision_recall_curve",
    "precision_recall_f1",
    "read_metrics",
    "roc_auc",
    "roc_curve",
    "rouge",
    "squad_exact_match",
    "squad_f1",
    "stratified_kfold_indices",
    "summarize_folds",
    "tagging_report",
    "to_jsonable",
    "token_accuracy",
    "tokenize_13a",
    "write_report",
]
