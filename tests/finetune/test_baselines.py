"""`--baseline`: baselines are fitted and scored on the run's very splits and K-fold folds, reported beside the
model, and refused (one line, exit 2) where they do not exist. scikit-learn, run here on the folds the recipe
draws, is the oracle."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
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


def minilm_features(texts: list[str], peer: str):
    """The oracle's frozen-lr features: all-MiniLM-L6-v2 mean-pooled over real tokens, computed by `transformers`
    (slow to import) or by lmforge's loader, which tests/hf/test_real_weights.py holds to sentence-transformers."""
    from lmforge.finetune.recipe import resolve_model

    folder = resolve_model("all-MiniLM-L6-v2")
    if peer == "transformers":
        import transformers

        model = transformers.AutoModel.from_pretrained(folder).eval()
        batch = transformers.AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    else:
        from lmforge.data.tokenizers.tokenizer import load_tokenizer
        from lmforge.hf.load import load_model

        model = load_model(folder)
        batch = load_tokenizer(folder).encode_batch(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_kfold_baselines_and_augmentation_use_the_runs_folds(tmp_path, sentiment_file):
    """Each fold's training part (and only it) gets EDA variants; the baselines fit on exactly those records."""
    from lmforge.finetune.augment import augment_training
    from lmforge.finetune.datasets import TaskData

    sentiment_file(tmp_path / "train.jsonl", 40, seed=0)
    flags = [
        "--model=lstm-tiny",
        f"--data={tmp_path / 'train.jsonl'}",
        "--kfold=2",
        "--max-steps=2",
        "--train.batch_size=8",
        "--model.vocab_size=120",
        "--baseline=tfidf,lstm",
        "--data.augment=eda",
        "--data.augment_factor=2",
    ]
    summary = finetune(config_of(tmp_path, *flags))
    config = config_of(tmp_path, *flags)
    data = load_task_data(config)
    pool = data.train + data.validation
    texts, labels = [r.text for r in pool], [r.label for r in pool]
    expected, held_out = [], []
    for train_idx, val_idx in stratified_kfold_indices(labels, 2, seed=config.train.seed):
        fold = TaskData([pool[i] for i in train_idx], [pool[i] for i in val_idx], None, "")
        train = augment_training(config, fold)[0].train
        assert len(train) == 2 * len(train_idx)
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        classifier = LogisticRegression(C=10.0, max_iter=2000)
        classifier.fit(vectorizer.fit_transform([r.text for r in train]), [r.label for r in train])
        predicted = classifier.predict(vectorizer.transform([texts[i] for i in val_idx]))
        held_out.append(len(val_idx))
        expected.append(accuracy_score([labels[i] for i in val_idx], predicted))

    tfidf = summary["baselines"]["tfidf"]
    assert tfidf["accuracy"]["values"] == pytest.approx(expected)
    assert tfidf["n_examples"]["values"] == summary["folds"]["n_examples"]["values"] == held_out  # not augmented
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


@pytest.mark.parametrize("peer", ["lmforge", pytest.param("transformers", marks=pytest.mark.slow)])
def test_frozen_lr_is_logistic_regression_on_minilms_mean_pooled_features(tmp_path, sentiment_file, peer):
    from lmforge.data.readers.records import ClassificationExample
    from lmforge.finetune.baselines import BASELINES
    from lmforge.finetune.tasks.classification import ClassificationTask

    rows = sentiment_file(tmp_path / "train.jsonl", 24, seed=3)
    records = [ClassificationExample(r["text"], (r["label"],)) for r in rows]
    train, held_out = records[:16], records[16:]
    task = ClassificationTask(config_of(tmp_path), None, ("negative", "positive"), None)
    scores = BASELINES["frozen-lr"].fit_score(task, train, {"validation": held_out}, train_model=None)

    features = minilm_features([r.text for r in records], peer)
    oracle = LogisticRegression(C=1.0, max_iter=5000).fit(features[:16], [r.label for r in train])
    probs = oracle.predict_proba(features[16:])  # classes_ are sorted: negative, positive
    assert scores["validation"]["accuracy"] == pytest.approx(
        accuracy_score([r.label for r in held_out], oracle.predict(features[16:]))
    )
    assert scores["validation"]["log_loss"] == pytest.approx(task.score(held_out, probs)[0]["log_loss"], abs=1e-4)


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


def test_an_lstm_can_start_from_minilms_embedding_and_tokenizer(tmp_path, sentiment_file):
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.finetune.datasets import TaskData
    from lmforge.finetune.recipe import build_finetune_model, load_tokenizer_for, resolve_model
    from lmforge.finetune.tasks import build_task
    from lmforge.hf.load import load_model
    from lmforge.train.distributed import init_distributed

    rows = sentiment_file(tmp_path / "train.jsonl", 8, seed=0)
    config = config_of(
        tmp_path, f"--data={tmp_path / 'train.jsonl'}", "--model=lstm-seed", "--model.embeddings=all-MiniLM-L6-v2"
    )
    data = load_task_data(config)
    tokenizer = load_tokenizer_for(config, data, tmp_path, init_distributed("cpu"))
    minilm = Path(resolve_model("all-MiniLM-L6-v2"))
    assert tokenizer.encode(rows[0]["text"]) == load_tokenizer(minilm).encode(rows[0]["text"])
    model = build_finetune_model(
        config, build_task(config, tokenizer, TaskData(data.train, data.validation, None, "")), tokenizer
    )
    table = load_model(minilm).tok_emb.weight
    assert model.tok_emb.weight.shape == table.shape == (30522, 384)
    assert torch.equal(model.tok_emb.weight, table)

    bad = config_of(
        tmp_path,
        f"--data={tmp_path / 'train.jsonl'}",
        "--model=all-MiniLM-L6-v2",
        "--model.embeddings=all-MiniLM-L6-v2",
    )
    with pytest.raises(ValueError, match="model.embeddings='all-MiniLM-L6-v2' seeds a preset's embedding"):
        load_tokenizer_for(bad, data, tmp_path, init_distributed("cpu"))
