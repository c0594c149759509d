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


def run(args: argparse.Namespace) -> None:
    from lmforge.train.config import help_text, parse_args

    if any(a in ("--help", "-h") for a in args.args):
        print(help_text())
        return
    config = parse_args(args.args)
    from lmforge.train.trainer import pretrain

    summary = pretrain(config)
    if os.environ.get("RANK", "0") != "0":  # torchrun: process 0 reports
        return
    if summary.get("samples"):
        print(summary["samples"])
    final = summary.get("final_val") or {}
    lines = [f"run folder: {summary['run_dir']}  (metrics.jsonl, loss.png, summary.md, samples.txt, checkpoints/)"]
    if final:
        lines.append(
            f"step {summary['steps']}: val loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
            f"bits/byte {final['bits_per_byte']:.3f}"
        )
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m lmforge.commands.pretrain ...`: the same command without the rest of the CLI."""
    try:
        run(argparse.Namespace(args=sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"lmforge pretrain: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
