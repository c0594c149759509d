"""SPACE.yaml parsing and validation against a recipe's schema: each mistake is one line naming the fix."""

from __future__ import annotations

import pytest

from lmforge.finetune.config import FINETUNE
from lmforge.pretrain.config import PRETRAIN
from lmforge.tune.space import Param, grid, load_space, parse_space


def test_a_space_parses_into_typed_params(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "optim.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}\n"
        "train.batch_size: {type: int, low: 8, high: 32, step: 8}\n"
        "model.dropout: {type: float, low: 0.0, high: 0.2, step: 0.1}\n"
        "task.method: {type: categorical, choices: [full, lora]}\n",
        encoding="utf-8",
    )
    space = load_space(path, FINETUNE)
    assert space["optim.lr"] == Param("optim.lr", "float", 1e-5, 1e-2, log=True)
    assert space["train.batch_size"] == Param("train.batch_size", "int", 8, 32, step=8)
    del space["optim.lr"]  # a log range has no grid
    assert grid(space) == {
        "train.batch_size": [8, 16, 24, 32],
        "model.dropout": [0.0, 0.1, 0.2],
        "task.method": ["full", "lora"],
    }


def test_a_float_range_without_a_step_has_no_grid():
    space = parse_space({"optim.lr": {"type": "float", "low": 0.1, "high": 0.2}}, PRETRAIN)
    with pytest.raises(ValueError, match="grid search needs a step"):
        grid(space)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "empty or not a mapping"),
        ({}, "empty or not a mapping"),
        (["optim.lr"], "empty or not a mapping"),
        ({"optim.lr": 0.1}, "must map to"),
        ({"optim.lr": {"type": "float", "low": 0.1, "high": 1, "size": 2}}, "unknown field"),
        ({"optim.lr": {"type": "real", "low": 0.1, "high": 1}}, "use one of float, int, categorical"),
        ({"optim.lr": {"type": "float", "high": 1}}, "needs a numeric low"),
        ({"optim.lrr": {"type": "float", "low": 0.1, "high": 1}}, "did you mean optim.lr"),
        ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, "low=1 > high=0.1"),
        ({"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "low must be > 0"),
        ({"optim.lr": {"type": "float", "low": -1, "high": 1, "log": True}}, "low must be > 0"),
        ({"train.seed": {"type": "categorical"}}, "categorical without choices"),
        ({"train.seed": {"type": "categorical", "choices": []}}, "categorical without choices"),
        ({"train.batch_size": {"type": "int", "low": 1.5, "high": 4}}, "not an integer"),
        ({"train.batch_size": {"type": "int", "low": 1, "high": 4, "step": 0}}, "positive number"),
    ],
)
def test_every_mistake_is_one_line(data, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse_space(data, PRETRAIN)
    assert "\n" not in str(caught.value)
