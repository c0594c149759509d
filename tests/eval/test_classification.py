"""Classification metrics against scikit-learn (the oracle) on random data with ties, several seeds."""

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from lmforge.eval import (
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

SEEDS = range(5)
TOL = 1e-9
NAMES = np.array(["cat", "dog", "eel", "fox", "gnu"])


def _labels(rng, n, k, strings):
    y = rng.integers(0, k, n)
    return NAMES[y] if strings else y


def _predictions(rng, y_true, k, strings, accuracy=0.6):
    """Noisy copies of y_true: right with probability `accuracy`, else a random class."""
    random_labels = _labels(rng, len(y_true), k, strings)
    return np.where(rng.random(len(y_true)) < accuracy, y_true, random_labels)


def _tied_probabilities(rng, n, k):
    """Rows that sum to 1 built from small integers, so many scores tie within and across columns."""
    counts = rng.integers(0, 4, (n, k)) + 1
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("strings", [False, True])
def test_label_metrics_match_sklearn(seed, strings):
    rng = np.random.default_rng(seed)
    k = 4
    y_true = _labels(rng, 300, k, strings)
    y_pred = _predictions(rng, y_true, k + 1, strings)  # predicts a class that never occurs in y_true
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=TOL)
    for average in ("macro", "micro", "weighted"):
        ours = precision_recall_f1(y_true, y_pred, average=average)
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx([p, r, f], abs=TOL)
    per_class = precision_recall_f1(y_true, y_pred, average=None)
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    assert list(per_class) == sorted(set(y_true) | set(y_pred))
    assert [v["precision"] for v in per_class.values()] == pytest.approx(p, abs=TOL)
    assert [v["recall"] for v in per_class.values()] == pytest.approx(r, abs=TOL)
    assert [v["f1"] for v in per_class.values()] == pytest.approx(f, abs=TOL)
    assert [v["support"] for v in per_class.values()] == list(s)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), sk.confusion_matrix(y_true, y_pred))


@pytest.mark.parametrize("seed", SEEDS)
def test_explicit_labels_subset_and_unseen_class_match_sklearn(seed):
    """A fixed label list (e.g. a LabelVocab) decides which classes count and their order, as in sklearn."""
    rng = np.random.default_rng(seed)
    y_true = _labels(rng, 200, 4, True)
    y_pred = _predictions(rng, y_true, 4, True)
    for labels in (["eel", "cat"], ["gnu", "dog", "cat", "eel", "fox"]):  # a subset; a superset with unseen gnu
        for average in ("macro", "micro", "weighted"):
            ours = precision_recall_f1(y_true, y_pred, labels=labels, average=average)
            expected = sk.precision_recall_fscore_support(
                y_true, y_pred, labels=labels, average=average, zero_division=0
            )[:3]
            assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx(expected, abs=TOL)
        np.testing.assert_array_equal(
            confusion_matrix(y_true, y_pred, labels=labels), sk.confusion_matrix(y_true, y_pred, labels=labels)
        )
        assert list(precision_recall_f1(y_true, y_pred, labels=labels, average=None)) == labels


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((150, 5)) < 0.3).astype(int)
    y_pred = np.where(rng.random((150, 5)) < 0.7, y_true, 1 - y_true)
    y_pred[:, 4] = 0  # a label never predicted: precision 0/0
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=TOL)
    for average in ("macro", "micro", "weighted", "samples"):
        ours = precision_recall_f1(y_true, y_pred, average=average)
        p, r, f, _ = sk.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx([p, r, f], abs=TOL)
    scores = np.round(rng.random((150, 5)) * 0.5 + 0.5 * y_true, 1)  # informative, tied scores
    for average in ("macro", "weighted", "micro"):
        assert roc_auc(y_true, scores, average=average) == pytest.approx(
            sk.roc_auc_score(y_true, scores, average=average), abs=TOL
        )
        assert average_precision(y_true, scores, average=average) == pytest.approx(
            sk.average_precision_score(y_true, scores, average=average), abs=TOL
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_curves_and_areas_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 250)
    scores = np.round(0.4 * y + 0.6 * rng.random(250), 1)  # ~11 distinct values: ties between classes
    for ours, theirs in zip(roc_curve(y, scores), sk.roc_curve(y, scores, drop_intermediate=False), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=TOL)
    for ours, theirs in zip(precision_recall_curve(y, scores), sk.precision_recall_curve(y, scores), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert roc_auc(y, scores) == pytest.approx(sk.roc_auc_score(y, scores), abs=TOL)
    assert average_precision(y, scores) == pytest.approx(sk.average_precision_score(y, scores), abs=TOL)
    names = np.array(["neg", "pos"])[y]  # string labels: the second sorted label is the positive class
    assert roc_auc(names, scores) == pytest.approx(sk.roc_auc_score(y, scores), abs=TOL)
    assert average_precision(names, scores) == pytest.approx(sk.average_precision_score(y, scores), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_one_vs_rest_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 4
    y = rng.integers(0, k, 300)
    probs = _tied_probabilities(rng, 300, k)
    probs[np.arange(300), y] += 0.5  # make the scores informative, then renormalise
    probs /= probs.sum(axis=1, keepdims=True)
    for average in ("macro", "weighted"):
        assert roc_auc(y, probs, average=average) == pytest.approx(
            sk.roc_auc_score(y, probs, multi_class="ovr", average=average), abs=TOL
        )
    onehot = np.eye(k)[y]
    assert roc_auc(y, probs, average="micro") == pytest.approx(sk.roc_auc_score(onehot.ravel(), probs.ravel()), abs=TOL)
    per_class = roc_auc(y, probs, average=None)
    assert list(per_class.values()) == pytest.approx([sk.roc_auc_score(y == c, probs[:, c]) for c in range(k)], abs=TOL)
    for average in ("macro", "weighted", "micro"):
        assert average_precision(y, probs, average=average) == pytest.approx(
            sk.average_precision_score(y, probs, average=average), abs=TOL
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_log_loss_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = NAMES[rng.integers(0, 3, 200)]
    probs = rng.dirichlet(np.ones(3), 200)
    probs[0] = [1.0, 0.0, 0.0]  # a certain prediction: clipped, not log(0)
    probs[1] = [0.0, 0.0, 1.0]
    assert log_loss(y, probs) == pytest.approx(sk.log_loss(y, y_proba=probs), abs=TOL)
    # columns in the order of `labels` (sklearn assumes sorted columns whatever the order of its labels)
    reordered = probs[:, [2, 0, 1]]
    assert log_loss(y, reordered, labels=["eel", "cat", "dog"]) == pytest.approx(sk.log_loss(y, y_proba=probs), abs=TOL)
    binary = rng.integers(0, 2, 200)
    p = rng.random(200)
    assert log_loss(binary, p) == pytest.approx(sk.log_loss(binary, y_proba=p), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_report_holds_every_metric_consistent_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = _labels(rng, 200, 3, True)
    probs = _tied_probabilities(rng, 200, 3)
    labels = ["cat", "dog", "eel"]
    y_pred = np.array(labels)[probs.argmax(axis=1)]
    report = classification_report(y_true, y_pred, probs=probs, labels=labels)
    json.dumps(report, allow_nan=False)  # JSON-ready as is
    assert report["labels"] == labels and report["n_examples"] == 200
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred), abs=TOL)
    assert report["f1_macro"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"), abs=TOL)
    assert report["recall_weighted"] == pytest.approx(sk.recall_score(y_true, y_pred, average="weighted"), abs=TOL)
    assert report["precision_micro"] == pytest.approx(report["accuracy"], abs=TOL)
    assert report["roc_auc"] == pytest.approx(sk.roc_auc_score(y_true, probs, multi_class="ovr"), abs=TOL)
    assert report["pr_auc"] == pytest.approx(sk.average_precision_score(y_true, probs), abs=TOL)
    assert report["log_loss"] == pytest.approx(sk.log_loss(y_true, y_proba=probs, labels=labels), abs=TOL)
    assert report["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert set(report["per_class"]) == set(labels)
    assert report["per_class"]["dog"]["support"] == int((y_true == "dog").sum())
    assert report["per_class"]["dog"]["roc_auc"] == pytest.approx(
        sk.roc_auc_score(y_true == "dog", probs[:, 1]), abs=TOL
    )


def test_report_marks_undefined_areas_as_none_instead_of_averaging_fewer_classes():
    y_true = ["a", "a", "b", "b"]  # class "c" never occurs: its one-vs-rest AUC is undefined
    probs = np.array([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    report = classification_report(y_true, ["a", "a", "b", "c"], probs=probs, labels=["a", "b", "c"])
    assert report["roc_auc"] is None and report["pr_auc"] is None
    assert report["per_class"]["c"]["roc_auc"] is None
    assert report["per_class"]["a"]["roc_auc"] == pytest.approx(sk.roc_auc_score([1, 1, 0, 0], probs[:, 0]), abs=TOL)
    assert report["log_loss"] == pytest.approx(sk.log_loss(y_true, y_proba=probs, labels=["a", "b", "c"]), abs=TOL)


def test_binary_report_uses_the_positive_column():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p1 = np.round(rng.random(100) * 0.5 + 0.5 * y, 2)
    report = classification_report(y, (p1 > 0.5).astype(int), probs=np.stack([1 - p1, p1], axis=1))
    assert report["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p1), abs=TOL)
    assert report["pr_auc"] == pytest.approx(sk.average_precision_score(y, p1), abs=TOL)
    assert "roc_auc" not in report["per_class"]["1"]


def test_report_refuses_labels_outside_the_label_list():
    with pytest.raises(ValueError, match=r"y_pred holds labels that are not in labels: \['z'\]"):
        classification_report(["a", "b"], ["a", "z"], labels=["a", "b"])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="3 examples but y_pred has 2"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="mixes string and numeric"):
        precision_recall_f1(["a", 1], ["a", "a"])
    with pytest.raises(ValueError, match="average='sample' is not one of"):
        precision_recall_f1([0, 1], [0, 1], average="sample")
    with pytest.raises(ValueError, match="one column per class"):
        roc_auc([0, 1, 2], np.ones((3, 2)) / 2)
    with pytest.raises(ValueError, match="no positive example"):
        roc_curve([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="probs has 2 columns but there are 3 classes"):
        log_loss([0, 1, 2], np.ones((3, 2)) / 2)
    with pytest.raises(ValueError, match="apply softmax"):
        log_loss([0, 1], [[2.0, -1.0], [0.5, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero division gives 0 quietly, like sklearn's zero_division=0
        assert precision_recall_f1([0, 0], [1, 1], average="macro") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
