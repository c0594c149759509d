"""`lmforge pretrain [--config FILE.yaml] [--section.key=value ...]`: the pretraining recipe from the command line.

The flags are not argparse options: `lmforge.train.config` parses them from the config dataclasses (one source
for YAML, flags and `--help`), so this parser only collects the arguments. With no arguments it runs the
default recipe (configs/default.yaml's settings: a small GPT on shakespeare-small, char level).

Several processes (DDP; gloo on CPU, NCCL on GPUs), one machine:

    torchrun --standalone --nproc_per_node=8 -m lmforge pretrain --config configs/default.yaml

Several machines: run the same command on every node, with the node count, this node's rank and a rendezvous
endpoint every node can reach (the first node's address):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 \
        -m lmforge pretrain --config configs/default.yaml        # node_rank=1 on the second node

`train.batch_size` is per process: the global batch is batch_size x processes x grad_accum. Process 0 logs
and writes checkpoints into `train.out` (use a shared file system across nodes so --resume finds them).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def register(commands, groups) -> None:
    parser = commands.add_parser(
        "pretrain",
        help="pretrain a model (lmforge pretrain --help lists every setting)",
        add_help=False,
        prefix_chars="\x00",  # every argument goes to lmforge.train.config, which owns the flags
    )
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)


def exit_status(stopped_by: str | None) -> int:
    """0 for a run that finished (or stopped early by its own rule); 128 + the signal number for one a signal
    interrupted after saving (130 SIGINT, 143 SIGTERM), so scripts can tell it from a finished run."""
    if stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, stopped_by))
    return 0


def run(args: argparse.Namespace) -> int:
    from lmforge.pretrain.config import help_text, parse_args

    if any(a in ("--help", "-h") for a in args.args):
        print(help_text())
        return 0
    config = parse_args(args.args)
    from lmforge.pretrain.trainer import pretrain

    summary = pretrain(config)
    status = exit_status(summary.get("stopped_by"))
    if os.environ.get("RANK", "0") != "0":  # torchrun: process 0 reports
        return status
    if summary.get("samples"):
        print(summary["samples"])
    final = summary.get("final_val") or {}
    lines = [f"run folder: {summary['run_dir']}  (metrics.jsonl, loss.png, summary.md, samples.txt, checkpoints/)"]
    if final:
        lines.append(
            f"step {summary['steps']}: val loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
            f"bits/byte {final['bits_per_byte']:.3f}"
        )
    if status:
        lines.append(f"interrupted by {summary['stopped_by']} at step {summary['steps']}: continue with --resume")
    print("\n".join(lines), file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m lmforge.commands.pretrain ...`: the same command without the rest of the CLI."""
    try:
        return run(argparse.Namespace(args=sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"lmforge pretrain: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge pretrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
