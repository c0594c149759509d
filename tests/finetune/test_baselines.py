"""`--baseline`: baselines are fitted and scored on the run's very splits and K-fold folds, reported beside the
model, and refused (one line, exit 2) where they do not exist. scikit-learn, run here on the folds the recipe
draws, is the oracle."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

from lmforge.cli import main as cli_main
from lmforge.eval import stratified_kfold_indices
from lmforge.finetune.config import FINETUNE
from lmforge.finetune.datasets import load_task_data
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--epochs=0", "--train.threads=1"]


def config_of(tmp_path, *flags):
    return parse_args([*QUIET, "--out", str(tmp_path), *flags], FINETUNE)


def test_kfold_baselines_use_the_runs_folds(tmp_path, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 48, seed=0)
    flags = [
        "--model=lstm-tiny",
        f"--data={tmp_path / 'train.jsonl'}",
        "--kfold=2",
        "--max-steps=2",
        "--train.batch_size=8",
        "--model.vocab_size=120",
        "--baseline=tfidf,lstm",
    ]
    summary = finetune(config_of(tmp_path, *flags))
    config = config_of(tmp_path, *flags)
    data = load_task_data(config)
    pool = data.train + data.validation
    texts, labels = [r.text for r in pool], [r.label for r in pool]
    expected = []
    for train_idx, val_idx in stratified_kfold_indices(labels, 2, seed=config.train.seed):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        classifier = LogisticRegression(C=10.0, max_iter=2000)
        classifier.fit(vectorizer.fit_transform([texts[i] for i in train_idx]), [labels[i] for i in train_idx])
        predicted = classifier.predict(vectorizer.transform([texts[i] for i in val_idx]))
        expected.append(accuracy_score([labels[i] for i in val_idx], predicted))

    tfidf = summary["baselines"]["tfidf"]
    assert tfidf["accuracy"]["values"] == pytest.approx(expected)
    assert tfidf["n_examples"]["values"] == summary["folds"]["n_examples"]["values"]  # the same held-out folds
    lstm = summary["baselines"]["lstm"]  # lstm-seed, trained by the recipe inside each fold
    assert lstm["n_examples"]["values"] == summary["folds"]["n_examples"]["values"]
    assert all(0 <= v <= 1 for v in lstm["accuracy"]["values"])
    run_dir = tmp_path / "lstm-tiny-train-classification"
    assert (run_dir / "fold_02" / "baselines" / "lstm-seed" / "tokenizer").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["baselines"]["tfidf"]["accuracy"]["values"] == pytest.approx(expected)
    report = (run_dir / "report.md").read_text()
    table = report.split("## Baselines")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][1:] == [
        "| this run",
        "| tfidf",
        "| lstm",
    ]


def test_most_frequent_tag_baseline_on_the_runs_splits(tmp_path):
    flags = [
        "--task=token-classification",
        "--model=lstm-tiny",
        "--data=wsj-pos",
        "--data.max_examples=60",
        "--max-steps=1",
        "--model.vocab_size=300",
        "--baseline=most-frequent-tag",
    ]
    summary = finetune(config_of(tmp_path, *flags))
    data = load_task_data(config_of(tmp_path, *flags))
    counts: dict[str, Counter] = {}
    for sentence in data.train:
        for token, tag in zip(sentence.tokens, sentence.tags, strict=True):
            counts.setdefault(token.lower(), Counter())[tag] += 1
    overall = Counter(t for s in data.train for t in s.tags).most_common(1)[0][0]
    for split, records in (("validation", data.validation), ("test", data.test)):
        gold = [t for s in records for t in s.tags]
        guess = [
            counts[w.lower()].most_common(1)[0][0] if w.lower() in counts else overall
            for s in records
            for w in s.tokens
        ]
        scores = summary["baselines"]["most-frequent-tag"][split]
        assert scores["token_accuracy"] == pytest.approx(accuracy_score(gold, guess))
    report = (tmp_path / "lstm-tiny-wsj-pos-token-classification" / "report.md").read_text()
    assert "| most-frequent-tag |" in report


def test_a_baseline_that_does_not_exist_for_the_task_is_one_line(tmp_path, capsys, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 20, seed=0)
    base = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--model=lstm-tiny", "--max-steps=1"]
    assert cli_main([*base, "--task=token-classification", "--data=wsj-pos", "--baseline=tfidf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "'tfidf' does not exist for task 'token-classification'" in err and "baselines: lstm, most-frequent-tag" in err
    )
    assert cli_main([*base, f"--data={tmp_path / 'train.jsonl'}", "--baseline=bow"]) == 2
    assert "baseline 'bow' does not exist; classification baselines: tfidf, frozen-lr, lstm" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
