"""`--data.augment`: variants are added to the training records only (validation and test untouched, K-fold
folds augmented after they are split off), the training set grows by the factor, and bad settings are one
line with exit 2. Back-translation is held to the seq2seq models' own beam-search outputs."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main as cli_main
from lmforge.finetune.augment import augment_training
from lmforge.finetune.config import FINETUNE
from lmforge.finetune.datasets import load_task_data
from lmforge.finetune.evaluation import load_finetuned
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args

QUIET = ["--train.progress=false", "--train.tensorboard=false", "--epochs=0", "--train.threads=1"]


def config_of(tmp_path, *flags):
    return parse_args([*QUIET, "--out", str(tmp_path), *flags], FINETUNE)


@pytest.fixture(scope="module")
def eda_run(tmp_path_factory, sentiment_file):
    tmp = tmp_path_factory.mktemp("eda")
    sentiment_file(tmp / "train.jsonl", 40, seed=0)
    sentiment_file(tmp / "test.jsonl", 10, seed=1)
    flags = [
        "--model=lstm-tiny",
        f"--data={tmp / 'train.jsonl'}",
        f"--data.test={tmp / 'test.jsonl'}",
        "--max-steps=1",
        "--train.batch_size=8",
        "--model.vocab_size=120",
        "--data.augment=eda",
        "--data.augment_factor=3",
    ]
    return tmp, flags, finetune(config_of(tmp, *flags))


def test_eda_grows_the_training_set_by_the_factor_and_nothing_else(eda_run):
    tmp, flags, summary = eda_run
    plain = load_task_data(config_of(tmp, *flags))  # the same splits, before augmentation
    assert summary["examples"] == {"train": 3 * len(plain.train), "validation": len(plain.validation), "test": 10}
    assert summary["augmented"] == {
        "method": "eda",
        "factor": 3,
        "original": len(plain.train),
        "added": 2 * len(plain.train),
    }
    assert summary["validation"]["n_examples"] == len(plain.validation) and summary["test"]["n_examples"] == 10

    augmented, _ = augment_training(config_of(tmp, *flags), plain)
    assert augmented.validation is plain.validation and augmented.test is plain.test
    assert augmented.train[: len(plain.train)] == plain.train
    originals = {r.text: r.labels for r in plain.train}
    held_out = {r.text for r in plain.validation + plain.test}
    for variant in augmented.train[len(plain.train) :]:
        assert variant.text not in originals and variant.text not in held_out
    # each original's 2 variants follow it in order and keep its label
    labels = [r.labels for r in plain.train for _ in range(2)]
    assert [r.labels for r in augmented.train[len(plain.train) :]] == labels


def test_back_translation_adds_the_round_trip_of_the_seq2seq_models(tmp_path, sentiment_file):
    pairs = [{"en": f"the {w} film", "es": f"la {w} pelicula"} for w in ("good", "bad", "dull", "fine", "long", "new")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    finetune(
        config_of(
            tmp_path,
            "--task=seq2seq",
            "--model=transformer-tiny",
            '--model.overrides={"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64}',
            f"--data={tmp_path / 'pairs.jsonl'}",
            "--data.val_fraction=0.34",
            "--max-steps=1",
            "--train.batch_size=2",
            "--model.vocab_size=100",
            "--task.eval_examples=1",
            "--task.num_beams=1",
            "--task.max_new_tokens=4",
            "--train.name=mt",
        )
    )
    sentiment_file(tmp_path / "train.jsonl", 12, seed=0)
    flags = [
        f"--data={tmp_path / 'train.jsonl'}",
        "--data.augment=backtranslate",
        f"--data.augment_model={tmp_path / 'mt'}",
    ]
    config = config_of(tmp_path, *flags)
    plain = load_task_data(config)
    augmented, note = augment_training(config, plain)

    model, _, task, _ = load_finetuned(tmp_path / "mt")
    texts = [r.text for r in plain.train]
    round_trip = task.generate(model, [(t, "") for t in task.generate(model, [(t, "") for t in texts])])
    expected = [(t, r.labels) for r, t in zip(plain.train, round_trip, strict=True) if t.strip() and t != r.text]
    assert [(r.text, r.labels) for r in augmented.train[len(plain.train) :]] == expected
    assert note["added"] == len(expected) > 0 and augmented.validation is plain.validation


def test_bad_augmentation_settings_are_one_line(eda_run, tmp_path, capsys, sentiment_file):
    run_dir = eda_run[0] / "lstm-tiny-train-classification"
    sentiment_file(tmp_path / "train.jsonl", 20, seed=0)
    base = ["finetune", *QUIET, "--out", str(tmp_path / "runs"), "--model=lstm-tiny", "--max-steps=1"]
    data = f"--data={tmp_path / 'train.jsonl'}"
    cases = [
        ([data, "--data.augment=eda", "--data.augment_factor=0"], "data.augment_factor=0 must be an integer >= 1"),
        ([data, "--data.augment=flip"], "data.augment='flip' is not one of eda, backtranslate"),
        (["--task=token-classification", "--data=wsj-pos", "--data.augment=eda"], "not 'token-classification'"),
        (
            [data, "--data.augment=backtranslate", f"--data.augment_model={run_dir}"],
            "is a classification model, not a seq2seq one",
        ),
        (
            [data, "--data.augment=backtranslate", f"--data.augment_model={run_dir}", "--data.augment_factor=3"],
            "set data.augment_factor=2",
        ),
    ]
    for flags, message in cases:
        assert cli_main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
