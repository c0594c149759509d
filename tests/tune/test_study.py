"""`lmforge tune` end to end on tiny runs: a grid study visits exactly its grid, best.yaml reruns to the same
score, report and plots are written, pruning stops a trial at the step it reached, a failing trial is recorded
and the study goes on, --resume continues a study, two workers share one, bad input fails before any trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lmforge.cli import main as cli_main
from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import parse_args
from lmforge.train.objective import Objective
from lmforge.tune import study as study_module
from lmforge.tune.study import TuneSettings, open_storage, tune

PNG = b"\x89PNG\r\n\x1a\n"


def load(out: Path, name: str = "lmforge", storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage, out))


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory, finetune_flags):
    out = tmp_path_factory.mktemp("grid")
    space = out / "space.yaml"
    space.write_text(
        "optim.lr: {type: categorical, choices: [0.001, 0.003]}\n"
        "train.batch_size: {type: int, low: 8, high: 16, step: 8}\n",
        encoding="utf-8",
    )
    settings = TuneSettings(
        recipe="finetune",
        space=str(space),
        metric="loss",
        direction="minimize",
        out=str(out / "out"),
        base_args=finetune_flags,
        trials=4,
        sampler="grid",
        pruner="none",
        seed=0,
    )
    return out / "out", tune(settings)


def test_a_grid_study_visits_exactly_the_grid(grid_study):
    out, summary = grid_study
    trials = load(out).trials
    assert summary["trials"] == 4 and summary["states"] == {"COMPLETE": 4}
    visited = sorted((t.params["optim.lr"], t.params["train.batch_size"]) for t in trials)
    assert visited == [(0.001, 8), (0.001, 16), (0.003, 8), (0.003, 16)]
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial_{i:04d}" for i in range(4)]
    for t in trials:  # the sampled values reached the run: its saved config holds them
        assert t.user_attrs["config"]["optim"]["lr"] == t.params["optim.lr"]
        assert t.user_attrs["config"]["train"]["batch_size"] == t.params["train.batch_size"]


def test_best_yaml_reruns_to_the_same_metric(grid_study):
    out, summary = grid_study
    rerun = finetune(parse_args(["--config", str(out / "best.yaml")], FINETUNE))
    assert rerun["validation"]["loss"] == pytest.approx(summary["best_value"], rel=1e-6)
    assert rerun["run_dir"] == str(out / "best")


def test_report_and_plots_are_written(grid_study):
    out, summary = grid_study
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| trial | optim.lr | train.batch_size | loss | state | duration (s) | note |" in report
    assert report.count("| COMPLETE |") == 4
    for name in ("history", "parallel_coordinates", "importances", "slice"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
        assert f"({name}.png)" in report
    assert not list(out.glob("*.tmp*"))


def test_trials_never_see_the_test_split(tmp_path, finetune_flags, sentiment_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: categorical, choices: [0.003]}\n", encoding="utf-8")
    settings = TuneSettings(
        recipe="finetune",
        space=str(space),
        metric="accuracy",
        out=str(tmp_path / "out"),
        base_args=[*finetune_flags, f"--data.test={sentiment_path}"],
        trials=1,
        pruner="none",
    )
    assert tune(settings)["final_test"] is None
    trial_dir = tmp_path / "out" / "trials" / "trial_0000"
    assert (trial_dir / "confusion_validation.png").is_file() and not list(trial_dir.glob("*_test.png"))
    settings.resume, settings.final_test = True, True
    final = tune(settings)["final_test"]
    assert final is not None and 0.0 <= final["accuracy"] <= 1.0
    assert "scored once" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def lr_study(tmp_path: Path, pretrain_flags: list[str], **settings) -> TuneSettings:
    """A pretraining study over the learning rate alone, writing to tmp_path/out."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n", encoding="utf-8")
    return TuneSettings(
        recipe="pretrain",
        space=str(space),
        metric="loss",
        direction="minimize",
        out=str(tmp_path / "out"),
        base_args=pretrain_flags,
        **settings,
    )


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruning_stops_a_trial_at_the_step_it_reached(tmp_path, pretrain_flags, monkeypatch):
    monkeypatch.setitem(study_module.PRUNERS, "median", AlwaysPrune)
    settings = lr_study(tmp_path, pretrain_flags, trials=2, pruner="median")
    summary = tune(settings)
    assert summary["states"] == {"PRUNED": 2} and summary["best_yaml"] is None
    for t in load(tmp_path / "out").trials:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["pruned_at_step"] == 2 == t.last_step  # the first evaluation, of 12 steps
    assert "pruned at step 2" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_prune_warmup_holds_the_pruner_back_until_that_step(tmp_path, pretrain_flags, monkeypatch):
    monkeypatch.setitem(study_module.PRUNERS, "median", AlwaysPrune)
    settings = lr_study(tmp_path, pretrain_flags, trials=1, pruner="median", prune_warmup=5)
    assert tune(settings)["states"] == {"PRUNED": 1}
    (trial,) = load(tmp_path / "out").trials
    assert sorted(trial.intermediate_values) == [2, 4, 6]  # every evaluation is still recorded
    assert trial.user_attrs["pruned_at_step"] == 6  # the first at or after step 5
    with pytest.raises(ValueError, match="--prune-warmup -1 must be >= 0"):
        tune(lr_study(tmp_path, pretrain_flags, trials=1, prune_warmup=-1))


def test_a_kfold_trial_reports_the_running_mean_after_each_fold(tmp_path, finetune_flags):
    config = parse_args([*finetune_flags, "--kfold=2", f"--train.out={tmp_path}", "--train.name=cv"], FINETUNE)
    calls = []
    summary = finetune(config, on_eval=lambda step, metrics: calls.append((step, metrics)))
    assert [step for step, _ in calls] == [1, 2]
    accuracy = summary["folds"]["accuracy"]["values"]
    for step, metrics in calls:
        assert metrics["accuracy"] == pytest.approx(sum(accuracy[:step]) / step)


def test_a_kfold_trial_is_pruned_between_folds(tmp_path, finetune_flags, monkeypatch):
    monkeypatch.setitem(study_module.PRUNERS, "median", AlwaysPrune)
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n", encoding="utf-8")
    out = tmp_path / "out"
    settings = TuneSettings(
        recipe="finetune",
        space=str(space),
        metric="accuracy",
        out=str(out),
        base_args=[*finetune_flags, "--kfold=3"],
        trials=1,
        pruner="median",
    )
    assert tune(settings)["states"] == {"PRUNED": 1}
    (trial,) = load(out).trials
    assert trial.user_attrs["pruned_at_step"] == 1  # after the first of three folds
    assert sorted(p.name for p in (out / "trials" / "trial_0000").glob("fold_*")) == ["fold_01"]


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, finetune_flags):
    space = tmp_path / "space.yaml"  # warmup longer than the 6-step run: the recipe refuses it
    space.write_text("optim.warmup_steps: {type: categorical, choices: [10, 0]}\n", encoding="utf-8")
    settings = TuneSettings(
        recipe="finetune",
        space=str(space),
        metric="accuracy",
        out=str(tmp_path / "out"),
        base_args=finetune_flags,
        trials=2,
        sampler="grid",
        pruner="none",
        seed=0,
    )
    summary = tune(settings)
    assert summary["states"] == {"COMPLETE": 1, "FAIL": 1}
    failed = next(t for t in load(tmp_path / "out").trials if t.state == TrialState.FAIL)
    assert failed.params["optim.warmup_steps"] == 10
    assert "warmup_steps=10 must be below" in failed.user_attrs["error"]
    assert "warmup_steps=10 must be below" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_resume_continues_a_study(tmp_path, pretrain_flags):
    settings = lr_study(
        tmp_path,
        pretrain_flags,
        trials=2,
        sampler="random",
        pruner="none",
        seed=1,
    )
    assert tune(settings)["trials"] == 2
    with pytest.raises(ValueError, match="already exists.*--resume"):
        tune(settings)
    settings.resume, settings.trials = True, 3
    assert tune(settings)["trials"] == 3
    assert [t.number for t in load(tmp_path / "out").trials] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "out" / "trials").iterdir()) == ["trial_0000", "trial_0001", "trial_0002"]


def test_two_workers_share_one_study(tmp_path, pretrain_flags):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n", encoding="utf-8")
    journal = tmp_path / "study.journal"
    argv = [sys.executable, "-m", "lmforge", "tune", "--recipe", "pretrain", "--space", str(space), "--metric"]
    argv += ["loss", "--direction", "minimize", "--trials", "4", "--sampler", "random", "--pruner", "none"]
    argv += ["--storage", str(journal), "--out", str(tmp_path / "out"), "--resume", *pretrain_flags]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    workers = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    ran = [{int(line.split()[1]) for line in log.splitlines() if line.startswith("trial ")} for log in logs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both worked, no trial run twice
    trials = load(tmp_path / "out", storage=str(journal)).trials
    assert len(trials) >= 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert ran[0] | ran[1] == {t.number for t in trials}
    assert sorted(p.name for p in (tmp_path / "out" / "trials").iterdir()) == [f"trial_{t.number:04d}" for t in trials]


def test_a_killed_workers_trial_is_failed_by_the_next_worker(tmp_path, pretrain_flags, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n", encoding="utf-8")
    journal, out = tmp_path / "study.journal", tmp_path / "out"
    argv = [sys.executable, "-m", "lmforge", "tune", "--recipe", "pretrain", "--space", str(space), "--metric"]
    argv += ["loss", "--direction", "minimize", "--trials", "2", "--pruner", "none", "--storage", str(journal)]
    argv += ["--out", str(out), "--resume", *pretrain_flags, "--train.max_steps=1000000"]  # a trial that never ends
    worker = subprocess.Popen(argv, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.poll() is None:
            if journal.exists() and "lmforge" in optuna.get_all_study_names(open_storage(str(journal), out)):
                running = load(out, storage=str(journal)).get_trials(states=(TrialState.RUNNING,))
                if running and study_module.HEARTBEAT_ATTR in running[0].system_attrs:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the first worker never started a trial")
    finally:
        worker.kill()  # SIGKILL: no chance to record anything
        worker.wait()
    monkeypatch.setattr(study_module, "GRACE_S", 0)  # this worker calls any trial without a fresh beat stale
    settings = TuneSettings(
        recipe="pretrain",
        space=str(space),
        metric="loss",
        direction="minimize",
        out=str(out),
        base_args=pretrain_flags,
        trials=2,
        pruner="none",
        storage=str(journal),
        resume=True,
    )
    time.sleep(1.0)  # the killed trial's last beat is now older than the grace period
    assert tune(settings)["states"] == {"FAIL": 1, "COMPLETE": 1}
    killed, finished = load(out, storage=str(journal)).trials
    assert killed.state == TrialState.FAIL and "stopped beating" in killed.user_attrs["error"]
    assert finished.state == TrialState.COMPLETE
    assert "stopped beating" in (out / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sampler", "bayes"], "--sampler 'bayes' is not one of"),
        (["--pruner", "asha"], "--pruner 'asha' is not one of"),
        (["--metric", "bleu"], "--metric 'bleu' is not reported"),
        (["--storage", "nosuchdb://x"], "--storage nosuchdb://x cannot be opened"),
        (["--storage", "/no/such/folder/j.log"], "cannot be opened"),
        (["--optim.lrr=0.1"], "did you mean optim.lr"),
        (["--trials", "0"], "--trials 0 must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_trial(tmp_path, pretrain_flags, capsys, flags, message):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n", encoding="utf-8")
    argv = ["tune", "--recipe", "pretrain", "--space", str(space), "--metric", "loss", "--out", str(tmp_path / "o")]
    assert cli_main([*argv, *pretrain_flags, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge tune: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "trials").exists()


class InterruptAtFirstEvaluation(optuna.pruners.BasePruner):
    """Ctrl-C arriving during a trial: SIGINT to this process at its first evaluation."""

    def prune(self, study, trial) -> bool:
        os.kill(os.getpid(), signal.SIGINT)
        return False


def test_ctrl_c_in_a_trial_stops_the_study_and_resume_continues_it(tmp_path, pretrain_flags, monkeypatch, capsys):
    """The training loop catches the signal to save a checkpoint; the study must still stop, not go on to the
    next trial (it did, and a SIGTERM'd tuning process kept running)."""
    monkeypatch.setitem(study_module.PRUNERS, "median", InterruptAtFirstEvaluation)
    settings = lr_study(tmp_path, pretrain_flags, trials=3, pruner="median")
    with pytest.raises(KeyboardInterrupt):
        tune(settings)
    (trial,) = load(tmp_path / "out").trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "interrupted by SIGINT"
    assert "interrupted after 0 complete trials: --resume continues it" in capsys.readouterr().err
    monkeypatch.setitem(study_module.PRUNERS, "median", optuna.pruners.NopPruner)
    settings.resume = True
    assert tune(settings)["states"] == {"FAIL": 1, "COMPLETE": 2}


class InterruptingLoss(Objective):
    """The task's loss, with Ctrl-C arriving during the first step."""

    def __init__(self, task) -> None:
        self.task = task

    def count(self, batch):
        return self.task.count(batch)

    def tokens(self, micro):
        return self.task.tokens(micro)

    def loss_sum(self, model, batch):
        os.kill(os.getpid(), signal.SIGINT)
        return self.task.loss_sum(model, batch)


def test_ctrl_c_in_a_fold_stops_the_kfold_run(tmp_path, finetune_flags):
    config = parse_args([*finetune_flags, "--kfold=2", f"--train.out={tmp_path}", "--train.name=cv"], FINETUNE)
    summary = finetune(config, objective=lambda task, model: InterruptingLoss(task))
    assert summary["stopped_by"] == "SIGINT" and summary["folds_done"] == 0
    assert (tmp_path / "cv" / "fold_01").is_dir() and not (tmp_path / "cv" / "fold_02").exists()
