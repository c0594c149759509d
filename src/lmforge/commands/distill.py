"""`lmforge distill --teacher T (--student S | --keep-every K) --task TASK --data DATA --out DIR [finetune flags]`.

    lmforge distill --teacher runs/minilm-pang-lee --keep-every 2 --task classification --data pang-lee-sentences
    lmforge distill --teacher runs/minilm-pang-lee --keep-every 2 --task classification --data pang-lee-sentences \
        --transfer pang-lee-reviews --transfer-sentences --transfer-max 10000
    lmforge distill --teacher SmolLM2-135M-Instruct --student llama-tiny --task sft --data pang-lee-sentences \
        --divergence reverse_kl --temperature 1 --cache-topk 64

The distillation flags are below; every other flag is `lmforge finetune`'s (steps, batch size, LoRA, ...),
since a distillation run is a fine-tuning run of the student whose loss also listens to the teacher
(`lmforge.compress.distill`). The run folder is the same: checkpoints (--resume), metrics, report, model/.
"""

from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    """Bad flags are a ValueError (one line, exit 2 from the CLI) instead of argparse's usage and exit."""

    def error(self, message: str):
        raise ValueError(f"{message} (lmforge distill --help lists every setting)")


def distill_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lmforge distill",
        description="Distil a teacher into a student on a task. Other flags are lmforge finetune's (--data, --out, "
        "--max-steps, ...; lmforge finetune --help lists them).",
    )
    p.add_argument("--teacher", required=True, help="teacher: a fine-tuned run or model folder, HF folder, GGUF, name")
    p.add_argument("--student", default=None, help="student: a preset (random weights) or a model folder")
    p.add_argument("--keep-every", type=int, default=None, help="student = the teacher's layers 0, K, 2K, ...")
    p.add_argument("--task", required=True, help="the fine-tuning task (lmforge finetune --help lists them)")
    p.add_argument("--divergence", default="kl", help="soft-target divergence: kl, reverse_kl or jsd (default: kl)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (loss scaled by T^2)")
    p.add_argument("--beta", type=float, default=0.5, help="generalised JSD's teacher weight (default: 0.5)")
    p.add_argument("--soft", type=float, default=1.0, help="weight of the soft-target loss (default: 1)")
    p.add_argument("--hard", type=float, default=1.0, help="weight of the task's own loss (default: 1)")
    p.add_argument("--hidden", type=float, default=0.0, help="weight of the hidden-state MSE (default: 0)")
    p.add_argument("--cosine", type=float, default=0.0, help="weight of the hidden-state cosine loss (default: 0)")
    p.add_argument("--attention", type=float, default=0.0, help="weight of the attention-map KL (default: 0)")
    p.add_argument(
        "--cache-topk",
        type=int,
        default=None,
        metavar="K",
        help="causal LMs: cache the teacher's top-K log-probabilities (and tail mass) per training sequence in the "
        "run folder; later epochs and --resume read them instead of running the teacher, and the divergence "
        "compares the K+1-way coarsened distributions (exact when K = vocabulary size)",
    )
    p.add_argument(
        "--transfer",
        default=None,
        metavar="DATA",
        help="classification: unlabelled texts (a catalog set, or a JSONL/CSV/text file) that join the training "
        "stream with no label, so only the teacher's soft targets train on them (Hinton et al.'s transfer set); "
        "texts also in the run's own records are dropped",
    )
    p.add_argument("--transfer-sentences", action="store_true", help="split each transfer text into sentences")
    p.add_argument("--transfer-max", type=int, default=None, metavar="N", help="a seeded sample of N transfer texts")
    return p


def register(commands, groups) -> None:
    parser = commands.add_parser(
        "distill",
        help="distil a teacher into a smaller student on a task (lmforge distill --help lists the settings)",
        add_help=False,
        prefix_chars="\x00",
    )
    parser.add_argument("args", nargs="*")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmforge.compress.distill import distill, settings_from_args
    from lmforge.compress.transfer import Transfer

    parser = distill_parser()
    try:
        own, rest = parser.parse_known_args(args.args)
    except SystemExit:  # --help printed the settings
        return
    transfer = None
    if own.transfer is not None:
        transfer = Transfer(own.transfer, sentences=own.transfer_sentences, limit=own.transfer_max)
    elif own.transfer_sentences or own.transfer_max is not None:
        raise ValueError("--transfer-sentences and --transfer-max cut the transfer set: add --transfer DATA")
    summary = distill(
        own.teacher,
        own.task,
        rest,
        student=own.student,
        every=own.keep_every,
        settings=settings_from_args(own),
        transfer=transfer,
    )
    metrics = summary.get("test") or summary.get("validation") or {}
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(json.dumps(numbers, indent=2))
    print(f"run folder: {summary['run_dir']}", file=sys.stderr)
