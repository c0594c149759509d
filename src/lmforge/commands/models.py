"""`lmforge models`, `lmforge info`, `lmforge demo`: the model library's commands."""

from __future__ import annotations

import argparse
import json

from lmforge.commands.common import parse_overrides


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmforge.models import PRESETS, build_config, model_stats

    table = Table(title="lmforge presets")
    for column in ("preset", "family", "parameters", "FLOPs/token"):
        table.add_column(column, justify="left" if column in ("preset", "family") else "right")
    for name, (family, _) in PRESETS.items():
        stats = model_stats(build_config(name))
        table.add_row(name, family, f"{stats['parameters']:,}", f"{stats['flops_per_token']:,}")
    Console().print(table)


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.models import build_config, model_stats

    config = build_config(args.model, **parse_overrides(args.set))
    stats = model_stats(config, seq_len=args.seq_len)
    print(json.dumps({"config": config.to_dict(), **stats, "seq_len": args.seq_len or "max_seq_len"}, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from lmforge.demo import run_demo

    run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        pretrain=not args.no_pretrain,
        pretrain_steps=args.pretrain_steps,
        out=args.out,
        zoo=not args.no_zoo,
        finetune=not args.no_finetune,
        finetune_steps=args.finetune_steps,
    )


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser("models", help="list the model presets with parameter counts and FLOPs/token")
    p.set_defaults(func=cmd_models)

    p = commands.add_parser("info", help="show a preset's or family's config, parameter count and FLOPs/token")
    p.add_argument(
        "model", help="preset (e.g. gpt2, llama-tiny) or family (gpt, llama, bert, roberta, t5, transformer)"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--seq-len", type=int, default=None, help="context length for FLOPs (default: max_seq_len)")
    p.set_defaults(func=cmd_info)

    p = commands.add_parser(
        "demo",
        help="get data, train a tokenizer, pretrain a small GPT, sample, fine-tune a classifier, tour the families",
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the default recipe's steps")
    p.add_argument("--no-pretrain", action="store_true", help="skip the pretraining run")
    p.add_argument("--finetune-steps", type=int, default=None, help="default: one epoch of pang-lee-sentences")
    p.add_argument("--no-finetune", action="store_true", help="skip fine-tuning the MiniLM classifier")
    p.add_argument("--no-zoo", action="store_true", help="skip the tour of the tiny presets")
    p.add_argument("--out", default="runs", help="where the run folder goes")
    p.add_argument("--steps", type=int, default=30, help="AdamW steps per tiny preset in the tour")
    p.add_argument("--batch-size", type=int, default=8, help="tour batch size")
    p.add_argument("--seq-len", type=int, default=128, help="tour sequence length")
    p.set_defaults(func=cmd_demo)
