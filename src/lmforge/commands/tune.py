"""`lmforge tune --recipe finetune|pretrain --space SPACE.yaml --metric NAME [--section.key=value ...]`: search a
recipe's settings with Optuna.

    lmforge tune --recipe finetune --space space.yaml --task classification --model all-MiniLM-L6-v2 \
        --data pang-lee-sentences --epochs 1 --metric accuracy --trials 30 --out runs/tune-minilm

The tuning flags below are the command's own; every other `--section.key=value` (and `--config BASE.yaml`) is a
base setting of the recipe, parsed by the recipe's config schema exactly as `lmforge finetune`/`pretrain` do.
Bad input is one line and exit 2 before any trial runs. Several workers: start the same command (with
`--resume`) on one `--storage` (a SQLAlchemy URL or a journal file) and they share the `--trials` budget.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(commands, groups) -> None:
    parser = commands.add_parser(
        "tune",
        help="search a recipe's settings with Optuna (lmforge tune --help lists the flags)",
        add_help=False,
        prefix_chars="\x00",  # recipe flags pass through to the recipe's config schema
    )
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)
    finder = commands.add_parser(
        "lr-find",
        help="learning-rate range test of a recipe: loss against an exponentially growing lr, and a suggestion",
        add_help=False,
        prefix_chars="\x00",
    )
    finder.add_argument("args", nargs="*")
    finder.set_defaults(func=run_lr_find)


class TuneParser(argparse.ArgumentParser):
    """argparse that raises its complaint (a ValueError: one line and exit 2, as every lmforge command)."""

    def error(self, message: str):
        raise ValueError(message)


def tune_parser() -> TuneParser:
    parser = TuneParser(
        prog="lmforge tune",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="any other --section.key=value (and --config BASE.yaml) sets the recipe's base config",
    )
    parser.add_argument("--recipe", required=True, help="finetune | pretrain")
    parser.add_argument("--space", required=True, help="SPACE.yaml: KEY: {type, low, high, log, step, choices}")
    parser.add_argument("--metric", required=True, help="validation metric the trials are scored on")
    parser.add_argument("--direction", default="maximize", help="maximize | minimize (default maximize)")
    parser.add_argument("--trials", type=int, default=20, help="trials in the study, all workers together")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after SECONDS")
    parser.add_argument("--sampler", default="tpe", help="tpe | gp | random | grid | cmaes (default tpe)")
    parser.add_argument("--pruner", default="median", help="none | median | hyperband (default median)")
    parser.add_argument(
        "--prune-warmup",
        type=int,
        default=0,
        help="no trial is pruned at an evaluation before this step (K-fold: folds done; default 0)",
    )
    parser.add_argument("--study", default="lmforge", help="study name in the storage")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL or journal file (default OUT/study.db)")
    parser.add_argument("--out", default="runs/tune", help="folder for trials/, best.yaml, report.md, plots")
    parser.add_argument("--resume", action="store_true", help="continue (or join) an existing study")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed")
    parser.add_argument("--final-test", action="store_true", help="score the best configuration on test, once")
    return parser


def settings_from(argv: list[str]):
    """TuneSettings from the command line: tune's flags, the rest as the recipe's base flags."""
    from lmforge.tune.study import TuneSettings

    known, base = tune_parser().parse_known_args(argv)
    return TuneSettings(
        recipe=known.recipe,
        space=known.space,
        metric=known.metric,
        out=known.out,
        base_args=base,
        trials=known.trials,
        timeout=known.timeout,
        sampler=known.sampler,
        pruner=known.pruner,
        prune_warmup=known.prune_warmup,
        direction=known.direction,
        study=known.study,
        storage=known.storage,
        resume=known.resume,
        seed=known.seed,
        final_test=known.final_test,
    )


def run(args: argparse.Namespace) -> None:
    if any(a in ("--help", "-h") for a in args.args):
        print(tune_parser().format_help())
        return
    from lmforge.tune.study import tune

    summary = tune(settings_from(args.args))
    print(json.dumps(summary))
    if summary["best_value"] is not None:
        print(
            f"best {summary['best_value']:.6g} with {summary['best_params']}; {summary['best_yaml']}", file=sys.stderr
        )


def lr_find_parser() -> TuneParser:
    parser = TuneParser(
        prog="lmforge lr-find",
        allow_abbrev=False,
        description="The learning-rate range test (Smith 2017): one short run of the recipe whose lr grows "
        "exponentially from --start-lr to --end-lr; writes OUT/lr_find.png and OUT/lr_find.json and suggests a lr.",
        epilog="any other --section.key=value (and --config BASE.yaml) sets the recipe's config, as for the recipe",
    )
    parser.add_argument("--recipe", required=True, help="finetune | pretrain")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="lr of the first step (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="lr of the last step (default 10)")
    parser.add_argument("--steps", type=int, default=100, help="steps of the sweep (default 100)")
    parser.add_argument("--out", default="runs/lr-find", help="folder for the sweep run, the plot and the JSON")
    return parser


def run_lr_find(args: argparse.Namespace) -> None:
    if any(a in ("--help", "-h") for a in args.args):
        print(lr_find_parser().format_help())
        return
    from lmforge.tune.lr_find import LRFindSettings, lr_find, summary_line

    known, base = lr_find_parser().parse_known_args(args.args)
    summary = lr_find(
        LRFindSettings(
            recipe=known.recipe,
            out=known.out,
            base_args=tuple(base),
            start_lr=known.start_lr,
            end_lr=known.end_lr,
            steps=known.steps,
        )
    )
    print(json.dumps(summary))
    print(summary_line(summary), file=sys.stderr)
