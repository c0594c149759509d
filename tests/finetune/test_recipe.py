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
    assert header == ["text", "label", "p_negative", "p_positive"]  # the input beside its prediction

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
    """With the default window settings: max_length 128 and doc_stride 128 could not fit any window."""
    summary = run(
        tmp_path,
        "--task=qa",
        "--model=bert-tiny",
        "--data=squad-derived",
        "--data.max_examples=120",
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


def test_sft_learns_only_from_responses(tmp_path, capsys):
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
        "--train.progress=true",
    )
    assert {"exact_match", "loss", "chrf"} <= set(summary["validation"])
    err = capsys.readouterr().err  # not a terminal: the bars print plain lines, the last one at 100%
    assert "validation: generating 4/4 examples" in err and "test: generating 4/4 examples" in err
    assert "validation: loss " in err  # over the features of those 4 (a reply cut off by max_length has none)


def test_kfold_reports_mean_and_std_over_folds(tmp_path, sentiment_file, capsys):
    sentiment_file(tmp_path / "train.jsonl", 60, seed=0)
    flags = ["--model=bert-tiny", f"--data={tmp_path / 'train.jsonl'}", "--kfold=3", "--model.vocab_size=200"]
    assert cli_main(["finetune", *QUIET, "--out", str(tmp_path), *flags, "--max-steps=3"]) == 0
    err = capsys.readouterr().err
    (closing,) = [line for line in err.splitlines() if line.startswith("run folder: ")]
    # the closing message names what the K-fold folder holds: no model/ or plots, which only fold runs have
    assert closing.endswith("(report.md, metrics.json, fold_01/ ... fold_03/ (one run per fold))")
    assert "\n  accuracy: " in err
    summary = {"folds": json.loads((tmp_path / "bert-tiny-train-classification" / "metrics.json").read_text())}
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


def test_max_steps_alone_sets_the_run_length_and_a_preset_is_warned_about(tmp_path, sentiment_file, capsys):
    sentiment_file(tmp_path / "train.jsonl", 80, seed=0)
    flags = ["--train.progress=false", "--train.tensorboard=false", "--out", str(tmp_path), "--model=bert-tiny"]
    config = parse_args(
        [*flags, f"--data={tmp_path / 'train.jsonl'}", "--max-steps", "2", "--model.vocab_size=200"], FINETUNE
    )
    assert finetune(config)["steps"] == 2  # not 3 default epochs of 72 examples: 14 steps
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if "random weights" in line]
    assert "bert-tiny" in warning and "72 examples" in warning and "--model all-MiniLM-L6-v2" in warning


def test_conflicting_run_lengths_fail_in_one_line_before_a_run_folder_exists(tmp_path, sentiment_file, capsys):
    sentiment_file(tmp_path / "train.jsonl", 40, seed=0)
    argv = ["finetune", "--out", str(tmp_path / "runs"), "--model=bert-tiny", f"--data={tmp_path / 'train.jsonl'}"]
    assert cli_main([*argv, "--epochs", "1", "--max-steps", "20"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "task.epochs=1 (--epochs) and train.max_steps=20 (--max-steps)" in line
    assert not (tmp_path / "runs").exists()


def test_single_label_training_data_is_refused_before_training(tmp_path, capsys):
    rows = [{"text": f"text number {i}", "label": "positive"} for i in range(40)]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--model=bert-tiny", "--max-steps=2"]
    assert cli_main([*argv, f"--data={tmp_path / 'one.jsonl'}", "--model.vocab_size=200"]) == 2
    err = capsys.readouterr().err
    assert "the training data has only one label 'positive'; classification needs at least two" in err
    assert "fine-tuning bert-tiny" not in err  # refused before training began
    assert not (tmp_path / "runs" / "bert-tiny-one-classification").exists()


def test_a_failed_run_removes_the_empty_run_folder_it_created(tmp_path, sentiment_file, capsys):
    sentiment_file(tmp_path / "train.jsonl", 40, seed=0)
    argv = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--model=bert-tiny", "--max-steps=2"]
    bad = [*argv, f"--data={tmp_path / 'train.jsonl'}", "--data.label_field=nope"]
    assert cli_main(bad) == 2
    assert "nope" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "bert-tiny-train-classification"
    assert not run_dir.exists()

    run_dir.mkdir(parents=True)  # a folder the user made (or an earlier run left) is never removed
    (run_dir / "notes.txt").write_text("mine", encoding="utf-8")
    assert cli_main(bad) == 2
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_a_new_head_is_reported_in_one_line(classifier_run, tmp_path, capsys):
    import warnings

    from lmforge import build_model, save_model

    tmp, _, _ = classifier_run
    save_model(build_model("bert-tiny", vocab_size=200), tmp_path / "encoder")  # no head: fine-tuning adds one
    tokenizer = tmp / "bert-tiny-train-classification" / "tokenizer"
    argv = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), f"--model={tmp_path / 'encoder'}",
            f"--model.tokenizer={tokenizer}", f"--data={tmp / 'train.jsonl'}", "--max-steps=1"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(argv) == 0
    assert not [w for w in caught if "newly initialised" in str(w.message)]
    err = capsys.readouterr().err
    assert "new head: classifier initialised randomly (expected for fine-tuning)" in err.splitlines()
    assert "newly initialised" not in err


def test_predict_reads_the_trained_text_field_and_writes_the_input_beside_the_label(tmp_path, sentiment_file):
    rows = sentiment_file(tmp_path / "plain.jsonl", 48, seed=0)
    reviews = [{"review": r["text"], "sentiment": r["label"]} for r in rows]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews), encoding="utf-8")
    run(
        tmp_path,
        "--model=bert-tiny",
        f"--data={tmp_path / 'reviews.jsonl'}",
        "--data.text_field=review",
        "--data.label_field=sentiment",
        "--max-steps=1",
        "--model.vocab_size=200",
    )
    model_dir = tmp_path / "bert-tiny-reviews-classification" / "model"
    inputs = tmp_path / "new.jsonl"
    inputs.write_text(json.dumps({"review": "a great film"}) + "\n" + json.dumps({"text": "dull"}) + "\n")
    assert cli_main(["predict", str(model_dir), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["review"] for p in predictions] == ["a great film", "dull"]
    assert all(p["label"] in ("positive", "negative") for p in predictions)

    table = tmp_path / "new.csv"
    table.write_text('id,review\n1,"a great film, truly"\n2,boring\n', encoding="utf-8")
    assert cli_main(["predict", str(model_dir), "--input", str(table), "--output", str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["review", "label"] and lines[1].startswith('"a great film, truly",')
    assert len(lines) == 3  # the header row is no input
