"""`lmforge tune`'s own flags are split from the recipe's base flags, which the recipe's schema parses."""

from __future__ import annotations

import shlex
from pathlib import Path

from lmforge.commands.tune import settings_from
from lmforge.finetune.config import FINETUNE
from lmforge.train.config import parse_args

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_tune_line_splits_into_settings_and_recipe_flags():
    line = next(line for line in README.read_text(encoding="utf-8").splitlines() if "lmforge tune " in line)
    settings = settings_from(shlex.split(line.split("  #", 1)[0])[2:])
    assert (settings.recipe, settings.metric, settings.trials, settings.out) == (
        "finetune",
        "accuracy",
        20,
        "runs/tune",
    )
    assert settings.sampler == "tpe" and settings.pruner == "median" and not settings.resume
    assert settings.prune_warmup == 0
    assert settings_from([*shlex.split(line.split("  #", 1)[0])[2:], "--prune-warmup", "160"]).prune_warmup == 160
    config = parse_args(settings.base_args, FINETUNE)
    assert (config.task.task, config.data.dataset) == ("classification", "pang-lee-sentences")
