"""Tuning results (issue "Tuning"), each against its reference measured in the same run.

1. samplers: TPE against random search at an equal budget (the same number of trials), three seeds each, on
   a pretraining recipe small enough for many trials: a 2-layer, 64-wide GPT on the first 200,000 characters
   of tiny Shakespeare, 150 steps per trial, validation loss minimised over lr, warmup, weight decay, beta2 and
   dropout. One plot: best-so-far validation loss against trial number, every study a line.
2. minilm: all-MiniLM-L6-v2 on pang-lee-sentences tuned on the training split only (validation = 20% of it,
   the test split untouched) within --timeout seconds, then the best configuration's stratified 10-fold accuracy
   on the very folds of the hand-set baseline (benchmarks/results/finetune_classification.json: 0.796 +- 0.020,
   3,200 sentences, seed 1337, val_fraction 0.1 pooled back), and the held-out test accuracy of the best
   configuration, scored once (`--final-test`).
3. workers: two `lmforge tune` processes started at once on one Optuna journal file finish N trials between
   them (the samplers' recipe, 100 steps a trial): every trial number is run by exactly one worker, both
   workers run some, and the study holds N complete trials.

    .venv/bin/python benchmarks/bench_tune.py --only samplers [--trials 40]
    .venv/bin/python benchmarks/bench_tune.py --only minilm [--timeout 3300]
    .venv/bin/python benchmarks/bench_tune.py --only workers [--trials 12]

Results: stdout and benchmarks/results/tune_<part>.json (+ tune_samplers.png); studies under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna

from lmforge.finetune.config import FINETUNE
from lmforge.finetune.recipe import finetune
from lmforge.train.config import config_from_dict, load_yaml
from lmforge.tune.study import TuneSettings, open_storage, tune

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SAMPLER_SPACE = """\
optim.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
optim.warmup_steps: {type: int, low: 0, high: 50}
optim.weight_decay: {type: float, low: 0.0, high: 0.3}
optim.beta2: {type: float, low: 0.9, high: 0.999}
model.dropout: {type: float, low: 0.0, high: 0.3}
"""
MINILM_BASE = [
    "--task=classification",
    "--model=all-MiniLM-L6-v2",
    "--data=pang-lee-sentences",
    "--data.max_examples=3200",
    "--data.max_length=64",
]


def save(part: str, result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"tune_{part}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def small_gpt(out: Path, steps: int = 150) -> tuple[Path, list[str]]:
    """The samplers' search space (written to OUT/space.yaml) and recipe flags: a 2-layer, 64-wide GPT."""
    corpus = out / "shakespeare-200k.txt"
    out.mkdir(parents=True, exist_ok=True)
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    space = out / "space.yaml"
    space.write_text(SAMPLER_SPACE, encoding="utf-8")
    return space, [
        "--model.name=gpt",
        '--model.overrides={"n_layer": 2, "n_head": 2, "d_model": 64}',
        f"--data.dataset={corpus}",
        "--data.block_size=64",
        "--train.batch_size=16",
        f"--train.max_steps={steps}",
        "--train.eval_every=50",
        "--train.eval_batches=8",
        "--train.save_every=0",
        "--train.sample_tokens=0",
        "--train.tensorboard=false",
        "--train.threads=1",
        "--optim.min_lr=1e-5",  # below the lowest searched lr
    ]


def samplers(out: Path, trials: int) -> dict:
    space, base = small_gpt(out)
    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    started = time.monotonic()
    for seed in range(3):
        for sampler in ("tpe", "random"):
            folder = out / f"{sampler}-{seed}"
            settings = TuneSettings(
                recipe="pretrain",
                space=str(space),
                metric="loss",
                direction="minimize",
                out=str(folder),
                base_args=base,
                trials=trials,
                sampler=sampler,
                pruner="none",
                study=f"{sampler}-{seed}",
                seed=seed,
                resume=True,
            )
            tune(settings)
            study = optuna.load_study(study_name=settings.study, storage=open_storage(None, folder))
            values = [t.value for t in study.trials if t.value is not None]
            curves[sampler].append(np.minimum.accumulate(values).tolist())
            print(f"{sampler} seed {seed}: best val loss {min(values):.4f} over {len(values)} trials", flush=True)
    plot_curves(curves, RESULTS / "tune_samplers.png")
    finals = {name: [c[-1] for c in runs] for name, runs in curves.items()}
    return {
        "trials_per_study": trials,
        "seconds": round(time.monotonic() - started, 1),
        "best_so_far": curves,
        "final_best": {name: {"mean": float(np.mean(v)), "values": v} for name, v in finals.items()},
        "plot": "benchmarks/results/tune_samplers.png",
    }


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"tpe": ("C0", "-"), "random": ("C1", "--")}  # the shared start-up trials overlap: dashes show both
    for name, runs in curves.items():
        color, style = styles[name]
        for i, curve in enumerate(runs):
            ax.plot(range(1, len(curve) + 1), curve, color=color, linestyle=style, label=name if i == 0 else None)
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation loss so far")
    ax.set_title("TPE vs random search, equal budget, 3 seeds each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def minilm(out: Path, timeout: float, trials: int) -> dict:
    started = time.monotonic()
    settings = TuneSettings(
        recipe="finetune",
        space=str(ROOT.parent / "configs" / "tune" / "minilm-pang-lee.yaml"),
        metric="accuracy",
        out=str(out / "study"),
        base_args=[*MINILM_BASE, "--data.val_fraction=0.2", "--train.eval_every=40"],
        trials=trials,
        timeout=timeout,
        sampler="tpe",
        pruner="median",
        prune_warmup=160,  # one epoch at batch 16: no trial is judged on its warm-up
        study="minilm",
        seed=0,
        final_test=True,
        resume=True,
    )
    summary = tune(settings)
    tuning_seconds = time.monotonic() - started
    best = load_yaml(Path(summary["best_yaml"]))
    # the baseline's folds: the same 3,200 sentences, seed and val_fraction, so the same pool order and folds
    best["data"].update(val_fraction=0.1, max_examples=3200)
    best["task"]["kfold"] = 10
    best["train"].update(out=str(out), name="best-10fold", eval_every=0, progress=False)
    kfold = finetune(config_from_dict(best, "best.yaml", FINETUNE))
    folds = kfold["folds"]
    return {
        "tuning_seconds": round(tuning_seconds, 1),
        "trials": summary["states"],
        "best_validation_accuracy": summary["best_value"],
        "best_params": summary["best_params"],
        "space": load_yaml(ROOT.parent / "configs" / "tune" / "minilm-pang-lee.yaml"),
        "kfold_accuracy": [folds["accuracy"]["mean"], folds["accuracy"]["std"]],
        "kfold_f1_macro": [folds["f1_macro"]["mean"], folds["f1_macro"]["std"]],
        "final_test": summary["final_test"],
        "report": summary["report"],
    }


def workers(out: Path, trials: int) -> dict:
    """Two `lmforge tune` processes on one journal file, started together; which trials each ran."""
    space, base = small_gpt(out, steps=100)
    journal, study_out = out / "study.journal", out / "study"
    argv = [sys.executable, "-m", "lmforge", "tune", "--recipe", "pretrain", "--space", str(space)]
    argv += ["--metric", "loss", "--direction", "minimize", "--trials", str(trials), "--sampler", "tpe"]
    argv += ["--pruner", "none", "--study", "two-workers", "--storage", str(journal), "--out", str(study_out)]
    argv += ["--resume", *base]
    started = time.monotonic()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}\n{logs}")
    ran = [sorted(int(line.split()[1]) for line in log.splitlines() if line.startswith("trial ")) for log in logs]
    study = optuna.load_study(study_name="two-workers", storage=open_storage(str(journal), study_out))
    states = [t.state.name for t in study.trials]
    numbers = sorted(ran[0] + ran[1])
    return {
        "trials_asked": trials,
        "seconds": round(time.monotonic() - started, 1),
        "worker_trials": ran,
        "study_trials": len(study.trials),
        "complete": states.count("COMPLETE"),
        "run_twice": sorted({n for n in numbers if numbers.count(n) > 1}),
        "every_trial_run_once": numbers == [t.number for t in study.trials],
        "best_loss": study.best_value,
        "command": " ".join(["lmforge", *argv[3:]]).replace(str(out), "runs/bench-tune/workers") + "  # twice, at once",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="samplers,minilm")
    parser.add_argument("--out", default="runs/bench-tune")
    parser.add_argument(
        "--trials",
        type=int,
        default=40,
        help="samplers: trials per study (TPE's first 10 are its seeded random start-up, equal to random search's); "
        "workers: trials the two workers finish between them (default 12)",
    )
    parser.add_argument("--timeout", type=float, default=3300.0, help="minilm: seconds before no new trial starts")
    args = parser.parse_args()
    parts = args.only.split(",")
    if "samplers" in parts:
        result = samplers(Path(args.out) / "samplers", args.trials)
        print(json.dumps(result["final_best"]))
        save("samplers", result)
    if "minilm" in parts:
        result = minilm(Path(args.out) / "minilm", args.timeout, trials=60)
        print(json.dumps(result))
        save("minilm", result)
    if "workers" in parts:
        result = workers(Path(args.out) / "workers", args.trials if args.trials != 40 else 12)
        print(json.dumps(result))
        save("workers", result)


if __name__ == "__main__":
    main()
