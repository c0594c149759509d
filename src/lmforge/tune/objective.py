"""One trial = one real run of a recipe with the trial's sampled settings.

The trial's config is built the way `lmforge finetune` / `lmforge pretrain` build theirs, through the recipe's
`Schema`: defaults < the base `--config` YAML < the base flags < the sampled values, with the run folder forced
to OUT/trials/trial_NNNN. The trial's value is a validation metric from the run summary (K-fold: the mean over
the held-out folds); a fine-tuning trial never encodes or scores the test split (`score_test=False`), so no
selection sees it. At every evaluation the recipe's `on_eval` hook reports the metric to Optuna
(`trial.report`) and raises `optuna.TrialPruned` when the pruner rejects the trial. A K-fold trial reports after
each fold (step k = folds done, value = the mean over them), so a poor configuration stops between folds.
`prune_warmup` holds the pruner back until a trial reports at that step or later: every report is recorded,
but the first evaluations of a run (a learning rate still warming up, a schedule four times longer than
another trial's) say little about where it ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from lmforge.finetune.config import FINETUNE
from lmforge.pretrain.config import PRETRAIN
from lmforge.train.config import Schema, parse_args
from lmforge.train.loop import INTERRUPTS
from lmforge.tune.space import Param, suggest

CLASSIFICATION_METRICS = (
    "loss",
    "accuracy",
    "log_loss",
    "roc_auc",
    "pr_auc",
    *(f"{m}_{a}" for m in ("precision", "recall", "f1") for a in ("micro", "macro", "weighted")),
)
TAGGING_METRICS = (
    "loss",
    "token_accuracy",
    *(f"{p}{m}_{a}" for p in ("", "entity_") for m in ("precision", "recall", "f1") for a in ("micro", "macro")),
    *(f"{m}_weighted" for m in ("precision", "recall", "f1")),
)
GENERATION_METRICS = ("loss", "perplexity", "bleu", "chrf", "exact_match")
# the validation metrics each fine-tuning task reports (its `evaluate`), by task name
TASK_METRICS = {
    "classification": CLASSIFICATION_METRICS,
    "token-classification": TAGGING_METRICS,
    "qa": ("loss", "exact_match", "f1"),
    "seq2seq": GENERATION_METRICS,
    "sft": GENERATION_METRICS,
}
PRETRAIN_METRICS = ("loss", "perplexity", "bits_per_byte")

OnEval = Callable[[int, dict[str, float]], None]


def _run_finetune(config: Any, on_eval: OnEval | None, score_test: bool) -> dict:
    from lmforge.finetune.recipe import finetune

    return finetune(config, on_eval=on_eval, score_test=score_test)


def _run_pretrain(config: Any, on_eval: OnEval | None, score_test: bool) -> dict:
    from lmforge.pretrain.trainer import pretrain

    return pretrain(config, on_eval=on_eval)


def _finetune_metrics(config: Any) -> tuple[str, ...]:
    return TASK_METRICS.get(config.task.task, ("loss",))


def _finetune_value(summary: dict, metric: str) -> Any:
    if "folds" in summary:
        return (summary["folds"].get(metric) or {}).get("mean")
    return (summary.get("validation") or {}).get(metric)


@dataclass(frozen=True)
class Recipe:
    """What tuning needs of a recipe: its config schema, its run function, the metrics it reports and where a
    run summary keeps the validation value of one."""

    name: str
    schema: Schema
    run: Callable[[Any, OnEval | None, bool], dict]
    metrics: Callable[[Any], tuple[str, ...]]
    value: Callable[[dict, str], Any]


RECIPES = {
    "finetune": Recipe("finetune", FINETUNE, _run_finetune, _finetune_metrics, _finetune_value),
    "pretrain": Recipe(
        "pretrain",
        PRETRAIN,
        _run_pretrain,
        lambda config: PRETRAIN_METRICS,
        lambda summary, metric: (summary.get("final_val") or {}).get(metric),
    ),
}


def trial_config(recipe: Recipe, base_args: list[str], values: dict[str, Any], out: Path, name: str) -> Any:
    """The recipe's config for one trial: base flags, then the sampled values, in the run folder OUT/trials/NAME."""
    sampled = [f"--{key}={value}" for key, value in values.items()]
    forced = [f"--train.out={Path(out) / 'trials'}", f"--train.name={name}", "--train.resume=false"]
    return parse_args(["--train.progress=false", *base_args, *sampled, *forced], recipe.schema)


def check_inputs(recipe: Recipe, base_args: list[str], params: dict[str, Param], metric: str, out: Path) -> None:
    """Fail before any trial: the base flags, both ends of every range (or every choice) and the metric name."""
    config = trial_config(recipe, base_args, {}, out, "check")
    for key, p in params.items():
        for value in p.choices if p.type == "categorical" else (p.low, p.high):
            trial_config(recipe, base_args, {key: value}, out, "check")
    reported = recipe.metrics(config)
    if metric not in reported:
        raise ValueError(
            f"--metric {metric!r} is not reported by this {recipe.name} run; use one of {', '.join(reported)}"
        )


class TrialObjective:
    """Optuna's objective: sample, run the recipe, return the validation metric. A run that raises is recorded
    with its error (`user_attrs["error"]`) and re-raised, so Optuna marks the trial FAIL and the study goes on."""

    def __init__(
        self,
        recipe: Recipe,
        base_args: list[str],
        params: dict[str, Param],
        metric: str,
        out: Path,
        prune_warmup: int = 0,
    ) -> None:
        self.recipe, self.base_args, self.params, self.metric, self.out = recipe, base_args, params, metric, out
        self.prune_warmup = prune_warmup

    def __call__(self, trial: optuna.Trial) -> float:
        values = suggest(trial, self.params)
        config = trial_config(self.recipe, self.base_args, values, self.out, f"trial_{trial.number:04d}")
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("run_dir", str(config.run_dir))

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            value = metrics.get(self.metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, step)
            if step >= self.prune_warmup and trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} {value:.4g})")

        try:
            summary = self.recipe.run(config, on_eval, False)
            if summary.get("stopped_by") in INTERRUPTS:  # the recipe saved and returned: the user stops the study
                trial.set_user_attr("error", f"interrupted by {summary['stopped_by']}")
                raise KeyboardInterrupt
            value = self.recipe.value(summary, self.metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"the run reported {self.metric}={value!r}")
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}".splitlines()[0])
            raise
        trial.set_user_attr("steps", summary.get("steps"))
        return float(value)
