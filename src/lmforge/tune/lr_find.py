"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", sec. 3.3):
one short run of the real recipe whose learning rate grows exponentially, step by step, from `start_lr` to
`end_lr`, and the training loss read against it.

    lr_k = start_lr (end_lr / start_lr)^(k / (steps - 1)),   k = 0 .. steps - 1

(`optim.schedule=exponential` of `lmforge.train.optim`, with no warmup). While the rate is too small the loss
barely moves; over a range it falls fast; past some rate the updates overshoot and the loss climbs, then
explodes. A good peak learning rate sits where the loss still falls steeply, below the minimum.

Each step's loss is one noisy mini-batch, so the curve is smoothed with a bias-corrected exponential moving
average, s_k = m_k / (1 - b^(k+1)) with m_k = b m_(k-1) + (1 - b) loss_k (b = SMOOTHING; a shorter memory than
fastai's 0.98, which lags by ~50 steps, half of a 100-step test), and cut where it diverges (s_k > DIVERGED x
min s, or a non-finite loss). Two suggestions, both common practice (fastai's `lr_find`):
    minimum / 10:  the rate of the lowest smoothed loss, divided by 10 (one decade before the overshoot);
    steepest:      the rate where s falls fastest against log(lr) (the most negative ds / dlog lr).
The suggested rate is the first: the steepest point sits on a noisier part of the curve.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.io import atomic_path, write_json_atomic
from lmforge.train.config import parse_args
from lmforge.tune.objective import RECIPES

SMOOTHING = 0.9
DIVERGED = 4.0
MIN_STEPS = 10


@dataclass
class LRFindSettings:
    """The `lmforge lr-find` command line, as data."""

    recipe: str
    out: str = "runs/lr-find"
    base_args: tuple[str, ...] = ()
    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100


def check_settings(s: LRFindSettings) -> None:
    if s.recipe not in RECIPES:
        raise ValueError(f"--recipe {s.recipe!r} is not one of {', '.join(RECIPES)}")
    if not (s.start_lr > 0 and math.isfinite(s.end_lr) and s.start_lr < s.end_lr):
        raise ValueError(f"--start-lr {s.start_lr:g} and --end-lr {s.end_lr:g} need 0 < start < end")
    if s.steps < MIN_STEPS:
        raise ValueError(f"--steps {s.steps} is too few to read a curve from; use >= {MIN_STEPS} (100 is typical)")


def sweep_config(s: LRFindSettings) -> Any:
    """The recipe's config of the sweep: the user's base flags, then the sweep's own settings (which win)."""
    forced = [
        "--optim.schedule=exponential",
        f"--optim.min_lr={s.start_lr!r}",
        f"--optim.lr={s.end_lr!r}",
        "--optim.warmup_steps=0",
        f"--train.max_steps={s.steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--train.save_every=0",
        "--train.early_stopping_patience=0",
        "--train.nan_policy=skip",  # the far end overflows: skip those steps instead of stopping the sweep
        "--train.sample_tokens=0",
        f"--train.out={Path(s.out)}",
        "--train.name=sweep",
        "--train.resume=false",
    ]
    return parse_args(["--train.progress=false", *s.base_args, *forced], RECIPES[s.recipe].schema)


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """Bias-corrected exponential moving average (see the module docstring)."""
    out, average = np.empty(len(losses)), 0.0
    for k, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * loss
        out[k] = average / (1.0 - beta ** (k + 1))
    return out


def suggest(lrs: np.ndarray, losses: np.ndarray) -> dict[str, Any]:
    """The smoothed curve, where it diverged, and the suggested learning rates (see the module docstring)."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = np.isfinite(losses)
    end = int(np.argmin(finite)) if not finite.all() else len(losses)  # up to the first non-finite loss
    smoothed = smooth(losses[:end])
    if len(smoothed) < MIN_STEPS:
        raise ValueError(
            f"the loss was finite for only {len(smoothed)} steps: lower --start-lr (the sweep began too high)"
        )
    running_min = np.minimum.accumulate(smoothed)
    over = np.nonzero(smoothed > DIVERGED * running_min)[0]
    cut = int(over[0]) if len(over) else len(smoothed)
    kept_lr, kept = lrs[:cut], smoothed[:cut]
    lowest = int(np.argmin(kept))
    slope = np.gradient(kept, np.log(kept_lr))
    steepest = int(np.argmin(slope[: max(lowest, 1)]))  # on the falling side of the minimum
    return {
        "smoothed": smoothed.tolist(),
        "diverged_at_lr": float(lrs[cut]) if cut < len(smoothed) else None,
        "min_loss_lr": float(kept_lr[lowest]),
        "steepest_lr": float(kept_lr[steepest]),
        "suggested_lr": float(kept_lr[lowest] / 10),
    }


def plot(lrs: np.ndarray, losses: np.ndarray, found: dict[str, Any], path: Path) -> Path:
    """Loss against learning rate (log axis): each step faint, the smoothed curve bold, the suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoothed = np.asarray(found["smoothed"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs[: len(smoothed)], smoothed, color="C0", linewidth=2, label="smoothed")
    for key, color, text in (("suggested_lr", "C2", "suggested (min / 10)"), ("steepest_lr", "C1", "steepest")):
        ax.axvline(found[key], color=color, linestyle="--", label=f"{text}: {found[key]:.2g}")
    if found["diverged_at_lr"] is not None:
        ax.axvline(found["diverged_at_lr"], color="C3", linestyle=":", label=f"diverged: {found['diverged_at_lr']:.2g}")
    shown = smoothed[: int(np.searchsorted(lrs, found["diverged_at_lr"]))] if found["diverged_at_lr"] else smoothed
    finite = shown[np.isfinite(shown)]
    low, high = float(finite.min()), float(np.percentile(finite, 95))
    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def lr_find(s: LRFindSettings) -> dict[str, Any]:
    """Run the sweep, read its training losses from metrics.jsonl, write OUT/lr_find.json and OUT/lr_find.png;
    returns the summary (suggested_lr, min_loss_lr, steepest_lr, diverged_at_lr, files)."""
    from lmforge.eval.plots import read_metrics

    check_settings(s)
    recipe = RECIPES[s.recipe]
    config = sweep_config(s)
    if config.run_dir.is_dir():  # OUT/sweep is lr-find's own folder: a new sweep replaces the last one
        shutil.rmtree(config.run_dir)
    recipe.run(config, None, False)
    records = [r for r in read_metrics(config.run_dir / "metrics.jsonl") if r.get("split") == "train"]
    records = [r for r in records if r.get("loss") is not None and r.get("lr") is not None]
    lrs = np.array([r["lr"] for r in records], dtype=float)
    losses = np.array([r["loss"] for r in records], dtype=float)
    found = suggest(lrs, losses)
    out = Path(s.out)
    image = plot(lrs, losses, found, out / "lr_find.png")
    summary = {
        "recipe": s.recipe,
        "start_lr": s.start_lr,
        "end_lr": s.end_lr,
        "steps": s.steps,
        **{k: v for k, v in found.items() if k != "smoothed"},
        "plot": str(image),
        "run_dir": str(config.run_dir),
        "curve": {"lr": lrs.tolist(), "loss": losses.tolist(), "smoothed": found["smoothed"]},
    }
    write_json_atomic(out / "lr_find.json", summary)
    return {k: v for k, v in summary.items() if k != "curve"} | {"json": str(out / "lr_find.json")}


def summary_line(summary: dict[str, Any]) -> str:
    diverged = summary["diverged_at_lr"]
    tail = f", diverged at {diverged:.2g}" if diverged is not None else ", no divergence (raise --end-lr)"
    return (
        f"suggested lr {summary['suggested_lr']:.2g} (lowest loss at {summary['min_loss_lr']:.2g} / 10; steepest "
        f"descent at {summary['steepest_lr']:.2g}{tail}); plot {summary['plot']}"
    )
