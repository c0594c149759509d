"""`lmforge finetune` end to end on small presets: every task trains, evaluates and reports; predictions agree
with the reported metrics (scikit-learn as the oracle); resume continues exactly; K-fold summarises folds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from lmforge.cli import main as cli_main
from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--epochs", "0"]


def run(tmp_path, *flags: str) -> dict:
    return finetune(parse_args([*QUIET, "--out", str(tmp_path), *flags], FINETUNE))


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, sentiment_file):
    tmp = tmp_path_factory.mktemp("classifier")
    sentiment_file(tmp / "train.jsonl", 240, seed=0)
    test_rows = sentiment_file(tmp / "test.jsonl", 60, seed=1)
    summary = run(
        tmp,
        "--task=classification",
        "--model=bert-tiny",
        f"--data={tmp / 'train.jsonl'}",
        f"--data.test={tmp / 'test.jsonl'}",
        "--max-steps=60",
        "--optim.lr=3e-3",
        "--train.batch_size=16",
        "--eval-every=20",
        "--model.vocab_size=200",
    )
    return tmp, summary, test_rows


def test_classification_learns_and_reports(classifier_run):
    tmp, summary, _ = classifier_run
    run_dir = tmp / "bert-tiny-train-classification"
    assert summary["test"]["accuracy"] > 0.9
    for name in (
        "report.md",
        "metrics.json",
        "roc_test.png",
        "pr_test.png",
        "confusion_test.png",
        "training_curves.png",
    ):
        assert (run_dir / name).is_file(), name
    for png in run_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_examples"] == 60 and metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert np.asarray(metrics["confusion_matrix"]).sum() == 60
    assert "## Per class" in (run_dir / "report.md").read_text()


def test_predictions_agree_with_the_reported_metrics(classifier_run, tmp_path):
    tmp, summary, test_rows = classifier_run
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in test_rows), encoding="utf-8")
    model_dir = tmp / "bert-tiny-train-classification" / "model"
    assert cli_main(["predict", str(model_dir), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    y_true, y_pred = [r["label"] for r in test_rows], [p["label"] for p in predictions]
    assert accuracy_score(y_true, y_pred) == pytest.approx(summary["test"]["accuracy"])
    assert f1_score(y_true, y_pred, average="macro") == pytest.approx(summary["test"]["f1_macro"])
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)

    assert cli_main(["predict", str(model_dir), "--input", str(inputs), "--output", str(tmp_path / "p.csv")]) == 0
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header == ["label", "p_negative", "p_positive"]

    out = tmp_path / "eval"
    code = cli_main(["evaluate", str(model_dir), "--data", str(tmp / "test.jsonl"), "--out", str(out)])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_resume_continues_exactly(tmp_path, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 120, seed=0)
    flags = [
        "--task=classification",
        "--model=bert-tiny",
        f"--data={tmp_path / 'train.jsonl'}",
        "--optim.schedule=constant",
        "--optim.lr=1e-3",
        "--train.batch_size=8",
        "--train.log_every=1",
        "--eval-every=0",
        "--model.vocab_size=200",
        "--train.deterministic=true",
    ]
    whole = tmp_path / "whole"
    run(whole, *flags, "--max-steps=12")
    parts = tmp_path / "parts"
    tokenizer = f"--model.tokenizer={whole / 'bert-tiny-train-classification' / 'tokenizer'}"  # same ids
    run(parts, *flags, tokenizer, "--max-steps=6")
    run(parts, *flags, tokenizer, "--max-steps=12", "--resume")

    def losses(root):
        lines = (root / "bert-tiny-train-classification" / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    assert len(losses(whole)) == 12
    assert losses(parts) == losses(whole)


def test_lora_trains_few_parameters_and_writes_an_adapter(tmp_path, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 80, seed=0)
    summary = run(
        tmp_path,
        "--task=classification",
        "--model=gpt-tiny",
        f"--data={tmp_path / 'train.jsonl'}",
        "--method=lora",
        "--max-steps=4",
        "--model.vocab_size=200",
    )
    assert summary["trainable_parameters"] < summary["parameters"] / 4
    run_dir = tmp_path / "gpt-tiny-train-classification"
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    from lmforge import load_model

    merged = load_model(run_dir / "model")  # LoRA merged: a plain model again
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_token_classification_on_wsj_pos(tmp_path):
    summary = run(
        tmp_path,
        "--task=token-classification",
        "--model=bert-tiny",
        "--data=wsj-pos",
        "--data.max_examples=200",
        "--max-steps=6",
        "--optim.lr=3e-3",
        "--model.vocab_size=500",
    )
    for key in ("token_accuracy", "accuracy", "f1_macro", "loss"):
        assert key in summary["validation"]
    assert summary["examples"]["validation"] >= 1


def test_qa_on_squad_derived(tmp_path):
    summary = run(
        tmp_path,
        "--task=qa",
        "--model=bert-tiny",
        "--data=squad-derived",
        "--data.max_examples=120",
        "--data.max_length=96",
        "--data.doc_stride=32",
        "--max-steps=4",
        "--model.vocab_size=500",
    )
    assert 0.0 <= summary["validation"]["exact_match"] <= summary["validation"]["f1"] <= 100.0


def test_seq2seq_translation_scores_bleu_and_chrf(tmp_path):
    summary = run(
        tmp_path,
        "--task=seq2seq",
        "--model=transformer-tiny",
        "--data=kjv-spanish",
        "--data.max_examples=200",
        "--data.max_length=48",
        "--data.max_target_length=48",
        "--task.eval_examples=8",
        "--task.max_new_tokens=8",
        "--task.num_beams=2",
        "--max-steps=4",
        "--model.vocab_size=400",
    )
    for key in ("bleu", "chrf", "rougeL", "loss", "perplexity"):
        assert key in summary["validation"]


def test_sft_learns_only_from_responses(tmp_path):
    summary = run(
        tmp_path,
        "--task=sft",
        "--model=llama-tiny",
        "--data=pang-lee-sentences",
        "--data.max_examples=64",
        "--task.eval_examples=4",
        "--task.max_new_tokens=4",
        "--max-steps=4",
        "--model.vocab_size=400",
    )
    assert {"exact_match", "loss", "chrf"} <= set(summary["validation"])


def test_kfold_reports_mean_and_std_over_folds(tmp_path, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 60, seed=0)
    summary = run(
        tmp_path,
        "--task=classification",
        "--model=bert-tiny",
        f"--data={tmp_path / 'train.jsonl'}",
        "--kfold=3",
        "--max-steps=3",
        "--model.vocab_size=200",
    )
    folds = summary["folds"]["accuracy"]
    values = [
        json.loads((tmp_path / "bert-tiny-train-classification" / f"fold_{k:02d}" / "metrics.json").read_text())[
            "accuracy"
        ]
        for k in (1, 2, 3)
    ]
    assert folds["values"] == pytest.approx(values)
    assert folds["mean"] == pytest.approx(np.mean(values)) and folds["std"] == pytest.approx(np.std(values, ddof=1))
    assert "mean" in (tmp_path / "bert-tiny-train-classification" / "report.md").read_text()


def test_bad_input_fails_with_a_clear_message(tmp_path, capsys, sentiment_file):
    sentiment_file(tmp_path / "train.jsonl", 40, seed=0)
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "so so", "label": "neutral"}) + "\n", encoding="utf-8")
    base = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--model=bert-tiny", "--max-steps=2"]
    code = cli_main([*base, f"--data={tmp_path / 'train.jsonl'}", f"--data.validation={tmp_path / 'val.jsonl'}"])
    assert code == 2 and "neutral" in capsys.readouterr().err

    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    assert cli_main([*base, f"--data={tmp_path / 'empty.jsonl'}"]) == 2
    assert "empty.jsonl" in capsys.readouterr().err

    code = cli_main([*base, f"--data={tmp_path / 'train.jsonl'}", "--method=lora", "--task.lora_targets=nope"])
    assert code == 2 and "nope" in capsys.readouterr().err

    assert cli_main([*base, "--data=wsj-pos"]) == 2  # a tagging set cannot feed classification
    assert "token-classification" in capsys.readouterr().err

    assert cli_main([*base, "--task.kfold=1"]) == 2
    assert "task.kfold" in capsys.readouterr().err


def test_continues_from_a_saved_lmforge_model(classifier_run, tmp_path):
    tmp, summary, _ = classifier_run
    model_dir = tmp / "bert-tiny-train-classification" / "model"  # lmforge format, with its tokenizer
    again = run(
        tmp_path,
        "--task=classification",
        f"--model={model_dir}",
        f"--data={tmp / 'train.jsonl'}",
        f"--data.test={tmp / 'test.jsonl'}",
        "--max-steps=2",
        "--optim.lr=1e-5",
    )
    assert again["test"]["accuracy"] >= summary["test"]["accuracy"] - 0.05  # the trained weights were loaded


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(classifier_run, tmp_path, capsys):
    from lmforge import build_model, save_model

    tmp, _, _ = classifier_run
    save_model(build_model("bert-tiny", vocab_size=50), tmp_path / "small")
    tokenizer = tmp / "bert-tiny-train-classification" / "tokenizer"  # 200 ids
    code = cli_main(
        ["finetune", *QUIET, "--out", str(tmp_path / "runs"), f"--model={tmp_path / 'small'}",
         f"--model.tokenizer={tokenizer}", f"--data={tmp / 'train.jsonl'}", "--max-steps=1"]
    )  # fmt: skip
    assert code == 2 and "do not belong together" in capsys.readouterr().err


def test_multi_label_text_pairs_class_weights_freezing_and_layer_decay(tmp_path):
    rows = []
    for i in range(64):
        labels = [name for name, on in (("sports", i % 2 == 0), ("music", i % 3 == 0)) if on] or ["other"]
        text = f"goal team {i}" if i % 2 == 0 else f"quiet day {i}"
        rows.append({"text": text, "other": "song" if i % 3 == 0 else "talk", "label": "|".join(labels)})
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = run(
        tmp_path,
        "--task=classification",
        "--model=bert-tiny",
        f"--data={tmp_path / 'multi.jsonl'}",
        "--data.multi_label=true",
        "--data.text_pair_field=other",
        "--task.freeze_embeddings=true",
        "--task.layer_lr_decay=0.8",
        "--max-steps=3",
        "--model.vocab_size=200",
    )
    assert {"f1_samples", "f1_micro", "f1_macro"} <= set(summary["validation"])
    assert summary["trainable_parameters"] < summary["parameters"]  # the embeddings stayed fixed

    single = [{"text": f"text {i}", "label": "rare" if i % 8 == 0 else "common"} for i in range(64)]
    (tmp_path / "skewed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in single), encoding="utf-8")
    summary = run(
        tmp_path,
        "--task=classification",
        "--model=bert-tiny",
        f"--data={tmp_path / 'skewed.jsonl'}",
        "--task.class_weights=balanced",
        "--max-steps=2",
        "--model.vocab_size=200",
    )
    assert summary["validation"]["n_examples"] == summary["examples"]["validation"]
