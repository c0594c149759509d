"""K-fold splits: partition, balance and stratification properties; fold summaries against numpy."""

import numpy as np
import pytest

from lmforge.eval import kfold_indices, stratified_kfold_indices, summarize_folds

SEEDS = range(5)


def _check_partition(splits, n, k):
    assert len(splits) == k
    validated = np.concatenate([val for _, val in splits])
    assert sorted(validated.tolist()) == list(range(n))  # every example validated exactly once
    for train, val in splits:
        assert np.intersect1d(train, val).size == 0
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
    sizes = [len(val) for _, val in splits]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "k"), [(10, 2), (101, 5), (37, 10), (7, 7)])
def test_kfold_partitions_the_examples_into_balanced_folds(seed, n, k):
    _check_partition(kfold_indices(n, k, seed=seed), n, k)


def test_kfold_is_reproducible_and_shuffled_by_the_seed():
    first, again, other = (kfold_indices(50, 5, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0][1], np.arange(10))  # not the first ten in order


@pytest.mark.parametrize("seed", SEEDS)
def test_stratified_folds_keep_class_proportions(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["common", "medium", "rare"], size=203, p=[0.7, 0.22, 0.08]).tolist()
    labels += ["rare"] * 5  # at least k of each class
    k = 5
    splits = stratified_kfold_indices(labels, k, seed=seed)
    _check_partition(splits, len(labels), k)
    array = np.array(labels)
    for cls in set(labels):
        per_fold = [int((array[val] == cls).sum()) for _, val in splits]
        assert max(per_fold) - min(per_fold) <= 1, (cls, per_fold)
    assert stratified_kfold_indices(labels, k, seed=seed)[0][1].tolist() == splits[0][1].tolist()


def test_bad_k_and_rare_classes_raise_clear_errors():
    with pytest.raises(ValueError, match="k=1 folds: cross-validation needs k >= 2"):
        kfold_indices(10, 1, seed=0)
    with pytest.raises(ValueError, match="k=11 folds but only 10 examples"):
        kfold_indices(10, 11, seed=0)
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 2)  # numpy labels are named plainly in the message
    with pytest.raises(ValueError, match=r"'c' has 2, 'b' has 3 example\(s\); use k <= 2"):
        stratified_kfold_indices(labels, 5, seed=0)


def test_summarize_folds_gives_mean_and_sample_std():
    rng = np.random.default_rng(0)
    folds = [
        {"accuracy": float(a), "f1_macro": float(f), "n_examples": 20, "labels": ["a", "b"], "per_class": {}}
        for a, f in rng.random((5, 2))
    ]
    summary = summarize_folds(folds)
    assert set(summary) == {"accuracy", "f1_macro", "n_examples"}  # lists and tables are skipped
    accuracies = np.array([f["accuracy"] for f in folds])
    assert summary["accuracy"]["mean"] == pytest.approx(accuracies.mean(), abs=1e-12)
    assert summary["accuracy"]["std"] == pytest.approx(accuracies.std(ddof=1), abs=1e-12)
    assert summary["accuracy"]["values"] == accuracies.tolist()
    assert summary["n_examples"]["std"] == 0.0


def test_summarize_folds_keeps_missing_values_visible():
    summary = summarize_folds([{"roc_auc": 0.8}, {"roc_auc": None}, {"roc_auc": float("nan")}, {"roc_auc": 0.6}])
    assert summary["roc_auc"]["values"] == [0.8, None, None, 0.6]
    assert summary["roc_auc"]["mean"] == pytest.approx(0.7)
    assert summary["roc_auc"]["std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert summarize_folds([{"x": 1.0}])["x"]["std"] is None
    with pytest.raises(ValueError, match="no folds"):
        summarize_folds([])
