"""The fine-tuning config as a new user meets it: the run length the user asked for is the one that runs, the
defaults start from pretrained weights at a learning rate they learn with, and `--help`'s examples parse."""

from __future__ import annotations

import math
import re

import pytest

from lmforge.finetune.config import FINETUNE, FTModelSection
from lmforge.finetune.recipe import DEFAULT_EPOCHS, random_weights_warning, training_steps
from lmforge.finetune.tasks import TASKS
from lmforge.train.config import help_text, parse_args


def _steps(*flags: str, n_train: int = 100, world_size: int = 1) -> int:
    config = parse_args(["--train.batch_size=8", *flags], FINETUNE)
    return training_steps(config, n_train, world_size).train.max_steps


def test_max_steps_alone_sets_the_length(tmp_path):
    assert _steps("--max-steps", "2") == 2  # was 39: the default 3 epochs overrode it
    assert _steps("--train.max_steps=20") == 20
    recipe = tmp_path / "run.yaml"
    recipe.write_text("train:\n  max_steps: 5\n", encoding="utf-8")
    assert _steps("--config", str(recipe)) == 5


def test_epochs_set_the_length_when_max_steps_is_not_set():
    assert _steps() == math.ceil(DEFAULT_EPOCHS * 100 / 8)
    assert _steps("--epochs", "1") == math.ceil(100 / 8)
    assert _steps("--epochs", "1", "--train.grad_accum=2", world_size=2) == math.ceil(100 / 32)
    assert _steps("--epochs", "0", "--max-steps", "7") == 7  # epochs=0 defers to max_steps


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "1", "--max-steps", "20"], r"both task.epochs=1 \(--epochs\) and train.max_steps=20"),
        (["--epochs", "0"], r"task.epochs=0 .*pass --max-steps N"),
    ],
)
def test_an_ambiguous_length_is_refused(flags, message):
    with pytest.raises(ValueError, match=message) as error:
        _steps(*flags)
    assert "\n" not in str(error.value)


def test_each_task_defaults_to_its_pretrained_model():
    expected = {
        "classification": "all-MiniLM-L6-v2",
        "token-classification": "all-MiniLM-L6-v2",
        "qa": "all-MiniLM-L6-v2",
        "sft": "SmolLM2-135M-Instruct",
        "lm": "SmolLM2-135M-Instruct",
        "seq2seq": "transformer-tiny",  # no pretrained encoder-decoder offline: a preset, with a warning
    }
    assert {name: TASKS[name].default_model for name in TASKS} == expected
    for name, model in expected.items():
        config = parse_args([f"--task={name}"], FINETUNE)
        assert config.model_name == config.with_model_name().model.name == model
        assert config.run_name == f"{model}-pang-lee-sentences-{name}"
    assert parse_args(["--task=sft", "--model=llama-tiny"], FINETUNE).model_name == "llama-tiny"
    assert parse_args([], FINETUNE).optim.lr == 1e-4  # what all-MiniLM-L6-v2 learns with in one epoch


def test_random_weights_on_little_data_are_warned_about_in_one_line():
    config = parse_args(["--model=bert-tiny"], FINETUNE)
    warning = random_weights_warning(config, 240)
    assert "random weights" in warning and "--model all-MiniLM-L6-v2" in warning and "\n" not in warning
    assert random_weights_warning(config, 50_000) is None
    assert random_weights_warning(parse_args([], FINETUNE).with_model_name(), 240) is None  # pretrained weights
    seq2seq = random_weights_warning(parse_args(["--task=seq2seq"], FINETUNE).with_model_name(), 240)
    assert "no pretrained seq2seq model" in seq2seq


def test_the_help_example_for_model_overrides_parses():
    help_ = FTModelSection.__dataclass_fields__["overrides"].metadata["help"]
    (example,) = re.findall(r"e\.g\. '(.+)'", help_)
    assert f"e.g. '{example}'" in help_text(FINETUNE)
    assert parse_args([f"--model.overrides={example}"], FINETUNE).model.overrides == {"n_layer": 2}
    assert parse_args(["--model.overrides.n_layer=2"], FINETUNE).model.overrides == {"n_layer": 2}
