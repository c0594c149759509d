"""What a study leaves in OUT: best.yaml (the best trial's full recipe, rerunnable as it is), report.md (every
trial: parameters, metric, state, duration) and Optuna's matplotlib plots, each file written atomically."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lmforge.io import atomic_path, write_text_atomic

MIN_TRIALS_FOR_IMPORTANCE = 3


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_config(study: optuna.Study, out: Path, name: str = "best") -> dict | None:
    """The best trial's config with its run folder moved to OUT/NAME, or None when no trial completed."""
    if not complete_trials(study):
        return None
    config = copy.deepcopy(study.best_trial.user_attrs["config"])
    config["train"].update({"out": str(out), "name": name, "resume": False})
    return config


def write_best(study: optuna.Study, out: Path, command: str) -> Path | None:
    """OUT/best.yaml: `lmforge COMMAND --config OUT/best.yaml` reruns the best trial's configuration."""
    import yaml

    config = best_config(study, out)
    if config is None:
        return None
    header = (
        f"# best trial {study.best_trial.number} of study {study.study_name}: value {study.best_value:.6g}\n"
        f"# rerun: lmforge {command} --config {out / 'best.yaml'}\n"
    )
    path = out / "best.yaml"
    write_text_atomic(path, header + yaml.safe_dump(config, sort_keys=False))
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def write_report(study: optuna.Study, out: Path, metric: str, plots: list[Path], final: dict | None = None) -> Path:
    """OUT/report.md: the study's settings, the best trial and a table of every trial."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({key for t in trials for key in t.params})
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    lines = [
        f"# Study {study.study_name}",
        "",
        f"{metric}, {study.direction.name.lower()}d; {len(trials)} trials: "
        + ", ".join(f"{n} {name.lower()}" for name, n in counts.items() if n),
        "",
    ]
    if complete_trials(study):
        best = study.best_trial
        lines += [
            f"Best: trial {best.number}, {metric} {best.value:.6g}, with "
            + ", ".join(f"{k}={_cell(v)}" for k, v in best.params.items()),
            "",
        ]
        lines += ["`best.yaml` holds its full recipe.", ""]
    if final:
        lines += ["## Test split of the best configuration (scored once)", ""]
        lines += [f"- {k}: {_cell(v)}" for k, v in final.items() if isinstance(v, (int, float))] + [""]
    lines += ["## Trials", "", "| trial | " + " | ".join(params) + f" | {metric} | state | duration (s) | note |"]
    lines.append("|" + "---|" * (len(params) + 5))
    for t in trials:
        duration = t.duration.total_seconds() if t.duration is not None else None
        note = t.user_attrs.get("error", "")
        if t.state == TrialState.PRUNED:
            note = f"pruned at step {t.user_attrs.get('pruned_at_step', t.last_step)}"
        row = [t.number, *(t.params.get(k) for k in params), t.value, t.state.name, duration, note]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, parameter importances (>= 2 parameters and enough complete trials), parallel
    coordinates and slices, as PNGs in OUT; a plot needs at least one complete trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vis

    done = complete_trials(study)
    if not done:
        return []
    n_params = len({key for t in done for key in t.params})
    plots = {"history": vis.plot_optimization_history, "parallel_coordinates": vis.plot_parallel_coordinate}
    if n_params >= 2 and len(done) >= MIN_TRIALS_FOR_IMPORTANCE:
        plots["importances"] = vis.plot_param_importances
    plots["slice"] = vis.plot_slice
    written = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = plot(study)
        figure = np.atleast_1d(axes).ravel()[0].figure
        path = out / f"{name}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
