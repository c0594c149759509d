"""Create or join an Optuna study and run trials of a recipe in it.

Storage: by default a SQLite file OUT/study.db; any SQLAlchemy URL (`postgresql://...`, `sqlite:///...`); or
a path without `://`, an Optuna journal file (`JournalStorage(JournalFileBackend(path))`, file-locked appends),
the simplest way for many workers on one file system. Every storage runs a heartbeat: a worker records one
every HEARTBEAT_S seconds while its trial runs, and a worker killed mid-trial stops beating; the next worker to
start a trial marks every RUNNING trial silent for more than GRACE_S seconds FAIL, and the study goes on.
Relational storages have Optuna's own heartbeat; Optuna's journal storage has none, so `HeartbeatJournalStorage`
gives it the same one (the beat is a trial system attribute, written to the journal like any other).

`trials` is the study's budget, shared by every worker on it (Optuna's `MaxTrialsCallback` counts finished and
running trials of all workers), so N workers started with `--trials 20` finish 20 trials between them, each
trial run once. Without `resume` a study that already exists is refused (its name is taken); with it the
study is continued, or joined by another worker, and created when missing.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # the interface Optuna's optimize loop drives
from optuna.trial import TrialState

from lmforge.tune.objective import RECIPES, TrialObjective, check_inputs
from lmforge.tune.report import best_config, write_best, write_plots, write_report
from lmforge.tune.space import Param, grid, load_space

HEARTBEAT_S = 30
GRACE_S = 90
HEARTBEAT_ATTR = "lmforge:heartbeat"
DIRECTIONS = ("maximize", "minimize")


def _sampler(name: str, params: dict[str, Param], seed: int | None) -> optuna.samplers.BaseSampler:
    samplers = optuna.samplers
    if name == "grid":
        return samplers.GridSampler(grid(params), seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  (CmaEsSampler imports it only when it samples)
        except ImportError:
            raise ValueError("--sampler cmaes needs the cmaes package: pip install cmaes") from None
    return SAMPLERS[name](seed=seed)


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
}
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    # Optuna's own default of 5 complete trials before any pruning: with 2, the median of two early runs
    # pruned 28 of 30 MiniLM trials at their first evaluation (benchmarks/bench_tune.py, 8 parameters), and
    # TPE learnt from two points. n_min_trials: a step's median needs 3 trials that reported at that step.
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0, n_min_trials=3),
    "hyperband": optuna.pruners.HyperbandPruner,
}


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its RDBStorage has. Optuna's `study.optimize` starts a thread
    per trial calling `record_heartbeat` every `get_heartbeat_interval()` seconds, and before each trial fails
    the trials `_get_stale_trial_ids` returns. A beat is the wall-clock time in a system attribute of the trial;
    a trial is stale when it is RUNNING and its last beat is older than `grace_period` (workers on several
    machines need clocks that agree to well within it, as NTP keeps them). A RUNNING trial with no beat at all
    (started by a worker without a heartbeat) is left alone."""

    def __init__(self, backend, heartbeat_interval: int = HEARTBEAT_S, grace_period: int = GRACE_S) -> None:
        super().__init__(backend)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None or now - beat <= self.grace_period:
                continue
            try:  # say why in the report; another worker may have failed it meanwhile
                self.set_trial_user_attr(
                    trial._trial_id, "error", f"its worker stopped beating for {now - beat:.0f} s (killed?)"
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def open_storage(url: str | None, out: Path) -> optuna.storages.BaseStorage:
    """The study's storage (see the module docstring); one line naming the URL when it cannot be opened."""
    if not url:
        url = f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    try:
        if "://" not in url:
            path = Path(url)
            if not path.parent.is_dir():
                raise ValueError(f"folder {path.parent} does not exist")
            from optuna.storages.journal import JournalFileBackend

            return HeartbeatJournalStorage(JournalFileBackend(str(path)), HEARTBEAT_S, GRACE_S)
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as error:  # SQLAlchemy, drivers and file systems each raise their own kind
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"--storage {url} cannot be opened: {message}") from None


def open_study(
    name: str, storage: optuna.storages.BaseStorage, sampler, pruner, direction: str, resume: bool
) -> optuna.Study:
    """Create the study, or with `resume` continue/join it (created when missing)."""
    exists = name in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise ValueError(
            f"study {name!r} already exists in this storage; pass --resume to continue it or a new --study"
        )
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction=direction, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {name!r} was created to {study.direction.name.lower()}, not to {direction}")
    return study


@dataclass
class TuneSettings:
    """The `lmforge tune` command line, as data."""

    recipe: str
    space: str
    metric: str
    out: str
    base_args: list[str] = field(default_factory=list)
    trials: int = 20
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    prune_warmup: int = 0
    direction: str = "maximize"
    study: str = "lmforge"
    storage: str | None = None
    resume: bool = False
    seed: int | None = None
    final_test: bool = False


def check_settings(s: TuneSettings) -> None:
    checks = (
        ("--recipe", s.recipe, RECIPES),
        ("--sampler", s.sampler, SAMPLERS),
        ("--pruner", s.pruner, PRUNERS),
        ("--direction", s.direction, DIRECTIONS),
    )
    for flag, value, options in checks:
        if value not in options:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(options)}")
    if s.trials < 1:
        raise ValueError(f"--trials {s.trials} must be >= 1")
    if s.timeout is not None and s.timeout <= 0:
        raise ValueError(f"--timeout {s.timeout} must be > 0 seconds")
    if s.prune_warmup < 0:
        raise ValueError(f"--prune-warmup {s.prune_warmup} must be >= 0 (the step from which trials may be pruned)")
    if s.final_test and s.recipe != "finetune":
        raise ValueError("--final-test scores a fine-tuning test split; pretraining has none")


def progress_line(metric: str, trials: int) -> Any:
    """An Optuna callback printing one line per finished trial with the best value so far."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
        value = f"{metric} {trial.value:.6g}" if trial.value is not None else trial.state.name.lower()
        if trial.state == TrialState.PRUNED:
            value = f"pruned at step {trial.user_attrs.get('pruned_at_step', trial.last_step)}"
        elif trial.state == TrialState.FAIL:
            value = f"failed: {trial.user_attrs.get('error', 'see the log')}"
        best = ""
        if any(t.state == TrialState.COMPLETE for t in done):
            best = f"; best {study.best_value:.6g} (trial {study.best_trial.number})"
        print(f"trial {trial.number} [{len(done)}/{trials}] {value}, {seconds:.1f}s{best}", file=sys.stderr, flush=True)

    return callback


def tune(settings: TuneSettings) -> dict:
    """Validate everything, then run trials until the study holds `trials` of them (or `timeout` passes); write
    best.yaml, report.md and plots to OUT; with `final_test`, rerun the best configuration once on the test
    split. Returns a summary."""
    check_settings(settings)
    recipe = RECIPES[settings.recipe]
    out = Path(settings.out)
    params = load_space(settings.space, recipe.schema)
    check_inputs(recipe, settings.base_args, params, settings.metric, out)
    sampler = _sampler(settings.sampler, params, settings.seed)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress line says what Optuna's log would
    storage = open_storage(settings.storage, out)
    study = open_study(
        settings.study, storage, sampler, PRUNERS[settings.pruner](), settings.direction, settings.resume
    )
    budget = optuna.study.MaxTrialsCallback(
        settings.trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    )
    objective = TrialObjective(recipe, settings.base_args, params, settings.metric, out, settings.prune_warmup)
    started = time.monotonic()
    if len(study.trials) < settings.trials:
        try:
            study.optimize(
                objective,
                timeout=settings.timeout,
                catch=(Exception,),
                callbacks=[budget, progress_line(settings.metric, settings.trials)],
                gc_after_trial=True,
            )
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM in a trial: Optuna recorded it as failed; the study stops
            done = sum(t.state == TrialState.COMPLETE for t in study.trials)
            print(f"study {study.study_name} interrupted after {done} complete trials: --resume continues it",
                  file=sys.stderr, flush=True)  # fmt: skip
            raise
    final = run_final_test(study, recipe, out) if settings.final_test else None
    plots = write_plots(study, out)
    best = write_best(study, out, recipe.name)
    report = write_report(study, out, settings.metric, plots, final)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return {
        "study": study.study_name,
        "trials": len(study.trials),
        "states": dict(Counter(t.state.name for t in study.trials)),
        "best_value": study.best_value if complete else None,
        "best_params": study.best_params if complete else None,
        "best_yaml": str(best) if best else None,
        "report": str(report),
        "plots": [str(p) for p in plots],
        "final_test": final,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_final_test(study: optuna.Study, recipe, out: Path) -> dict | None:
    """The best configuration, trained once more in OUT/final_test and scored on the test split: the only time
    any test data is looked at."""
    from lmforge.train.config import config_from_dict

    config = best_config(study, out, name="final_test")
    if config is None:
        return None
    summary = recipe.run(config_from_dict(config, "best trial", recipe.schema), None, True)
    test = summary.get("test")
    if test is None:
        raise ValueError("--final-test: the data has no test split (set data.test or use a dataset with one)")
    return {k: v for k, v in test.items() if isinstance(v, (int, float)) and math.isfinite(v)}
