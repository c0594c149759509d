"""`lmforge finetune --task TASK --model MODEL --data DATA [--section.key=value ...]`: fine-tune and evaluate.

    lmforge finetune --task classification --model all-MiniLM-L6-v2 --data pang-lee-sentences --epochs 2
    lmforge finetune --task token-classification --model all-MiniLM-L6-v2 --data wsj-pos
    lmforge finetune --task sft --model SmolLM2-135M-Instruct --data pang-lee-sentences --method lora
    lmforge finetune --task classification --data pang-lee-sentences --kfold 10

Flags are parsed from the config dataclasses (`lmforge.finetune.config`), like `lmforge pretrain`'s; `--help`
lists every key. The run folder holds checkpoints, metrics.jsonl, metrics.json, report.md, plots, and the
final model in model/ (with task.json, so `lmforge evaluate` and `lmforge predict` can use it); a K-fold run
holds report.md and metrics.json over the folds and one run folder per fold. The closing message lists what
the run folder actually holds.
Several processes: `torchrun --nproc_per_node=N -m lmforge finetune ...` (see `lmforge pretrain`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(commands, groups) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a model on a task and evaluate it (lmforge finetune --help lists every setting)",
        add_help=False,
        prefix_chars="\x00",
    )
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)


def _headline(metrics: dict) -> str:
    keys = ("accuracy", "f1_macro", "roc_auc", "f1_micro", "token_accuracy", "exact_match", "f1", "bleu", "chrf")
    parts = [f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), (int, float))]
    if isinstance(metrics.get("loss"), (int, float)):
        parts.append(f"loss {metrics['loss']:.4f}")
    return ", ".join(parts)


def _contents(run_dir: Path) -> str:
    """The run folder's entries as the closing message lists them: the report first, folds as one range."""
    entries = sorted(p for p in run_dir.iterdir() if not p.name.startswith("."))
    first = {"report.md": 0, "metrics.json": 1}
    entries.sort(key=lambda p: first.get(p.name, 2))
    folds = [p.name for p in entries if p.is_dir() and p.name.startswith("fold_")]
    names = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in folds]
    if folds:
        names.append(f"{folds[0]}/ ... {folds[-1]}/ (one run per fold)" if len(folds) > 1 else f"{folds[0]}/")
    return ", ".join(names)


def run(args: argparse.Namespace) -> int:
    from lmforge.commands.pretrain import exit_status
    from lmforge.finetune.config import FINETUNE
    from lmforge.train.config import help_text, parse_args

    if any(a in ("--help", "-h") for a in args.args):
        print(help_text(FINETUNE))
        return 0
    config = parse_args(args.args, FINETUNE)
    from lmforge.finetune.recipe import finetune

    summary = finetune(config)
    status = exit_status(summary.get("stopped_by"))
    if os.environ.get("RANK", "0") != "0":
        return status
    lines = [f"run folder: {summary['run_dir']}  ({_contents(Path(summary['run_dir']))})"]
    if "folds" in summary:
        for name, stats in summary["folds"].items():
            if isinstance(stats, dict) and "mean" in stats:
                lines.append(f"  {name}: {stats['mean']:.4f} ± {stats['std']:.4f}")
    for split in ("validation", "test"):
        if split in summary:
            lines.append(f"{split}: {_headline(summary[split])}")
    if status:
        lines.append(f"interrupted by {summary['stopped_by']} at step {summary['steps']}: continue with --resume")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k in ("run_dir", "model_dir", "steps")}))
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m lmforge.commands.finetune ...`: the same command without the rest of the CLI."""
    try:
        return run(argparse.Namespace(args=sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"lmforge finetune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge finetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
