"""The run config: YAML recipes, flags and their precedence, typed values, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.pretrain.config import PRETRAIN, RunConfig, help_text, parse_args
from lmforge.train.config import config_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_no_arguments_is_the_default_recipe_file():
    assert parse_args([]) == parse_args(["--config", str(CONFIGS / "default.yaml")])
    # what checkpoints store reads back
    assert config_from_dict(RunConfig().to_dict(), "checkpoint", PRETRAIN) == RunConfig()


def test_every_shipped_recipe_loads():
    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert recipes, "configs/*.yaml missing"
    for recipe in recipes:
        parse_args(["--config", str(recipe)])


def test_yaml_then_flags_in_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: llama-tiny\n  overrides: {n_layer: 2}\ntrain:\n  max_steps: 7\n  seed: 3\n")
    config = parse_args(
        ["--config", str(recipe), "--seed", "5", "--optim.lr=3e-4", "--model.overrides.d_model=64", "--resume"]
    )
    assert config.model.name == "llama-tiny"
    assert config.model.overrides == {"n_layer": 2, "d_model": 64}
    assert config.train.max_steps == 7  # from the file
    assert config.train.seed == 5  # flag beats file
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.train.resume is True


def test_stable_flags():
    config = parse_args(
        ["--model=gpt-tiny", "--data", "x.txt", "--out", "o", "--max-steps", "9", "--save-every=3", "--eval-every=4"]
    )
    assert (config.model.name, config.data.dataset, config.train.out) == ("gpt-tiny", "x.txt", "o")
    assert (config.train.max_steps, config.train.save_every, config.train.eval_every) == (9, 3, 4)
    assert config.run_dir == Path("o") / "gpt-tiny-x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train.max_step=3"], "did you mean train.max_steps"),
        (["--max-step=3"], "did you mean --max-steps"),
        (["--trian.seed=3"], "did you mean train"),
        (["--optim.lr=fast"], "optim.lr='fast' is not a number"),
        (["--train.batch_size=2.5"], "not an integer"),
        (["--train.compile=maybe"], "not a boolean"),
        (["--max-steps=0"], "train.max_steps=0 must be >= 1"),
        (["--train.dtype=fp8"], "train.dtype='fp8' is not one of"),
        (["--optim.schedule=cos"], "schedule"),
        (["--max-steps"], "--max-steps needs a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_flags_name_the_key(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_args(argv)


def test_bad_yaml_keys_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'train.max_stpes'; did you mean train.max_steps"):
        parse_args(["--config", str(recipe)])
    recipe.write_text("training:\n  seed: 3\n")
    with pytest.raises(ValueError, match="unknown config section 'training'.*did you mean train"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_help_lists_every_key_with_its_help():
    text = help_text()
    for key in ("--model.name", "--data.block_size", "--optim.warmup_steps", "--train.grad_accum", "--max-steps"):
        assert key in text
    assert "not applied to norms" in text  # OptimConfig's field comments become help
