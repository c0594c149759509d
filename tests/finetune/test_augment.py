"""`--data.augment`: variants are added to the training records only (validation and test untouched, K-fold
folds augmented after they are split off), the training set grows by the factor, and bad settings are one
line with exit 2. Back-translation is held to the seq2seq models' own beam-search outputs."""

from __future__ import annotations

import json

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


def test_eda_grows_the_training_set_by_the_factor_and_nothing_else(tmp_path, sentiment_file):
    """The recipe applies this to each run's (or fold's) training records: tests/finetune/test_baselines.py runs it."""
    sentiment_file(tmp_path / "train.jsonl", 40, seed=0)
    sentiment_file(tmp_path / "test.jsonl", 10, seed=1)
    flags = [f"--data={tmp_path / 'train.jsonl'}", f"--data.test={tmp_path / 'test.jsonl'}", "--data.augment=eda"]
    config = config_of(tmp_path, *flags, "--data.augment_factor=3")
    plain = load_task_data(config)
    augmented, note = augment_training(config, plain)
    assert len(augmented.train) == 3 * len(plain.train)
    assert note == {"method": "eda", "factor": 3, "original": len(plain.train), "added": 2 * len(plain.train)}
    assert augmented.validation is plain.validation and augmented.test is plain.test
    assert augmented.train[: len(plain.train)] == plain.train
    originals = {r.text for r in plain.train}
    held_out = {r.text for r in plain.validation + plain.test}
    for variant in augmented.train[len(plain.train) :]:
        assert variant.text not in originals and variant.text not in held_out
    # each original's 2 variants follow it in order and keep its label
    assert [r.labels for r in augmented.train[len(plain.train) :]] == [r.labels for r in plain.train for _ in range(2)]
    assert augment_training(config_of(tmp_path, *flags, "--data.augment_factor=1"), plain)[0] is plain


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


def test_bad_augmentation_settings_are_one_line(tmp_path, capsys, sentiment_file):
    from lmforge.finetune.recipe import save_final
    from lmforge.finetune.tasks.classification import ClassificationTask
    from lmforge.models import build_model

    sentiment_file(tmp_path / "train.jsonl", 20, seed=0)
    config = config_of(tmp_path, f"--data={tmp_path / 'train.jsonl'}", "--model=lstm-tiny")
    run_dir = tmp_path / "classifier"  # a classification model folder as the recipe writes it (untrained)
    save_final(
        build_model("lstm-tiny", head="sequence_classification"),
        ClassificationTask(config, None, ("a", "b"), None),
        config,
        run_dir,
    )
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
