"""The `lmforge` command. Each subcommand is a thin function that parses its arguments and calls the library;
the subcommands live in `lmforge.commands`, one module per group."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge import __version__
from lmforge.interrupts import latched

COMMAND_MODULES = (
    "lmforge.commands.models",  # models, info, demo
    "lmforge.commands.convert",  # convert, inspect
    "lmforge.commands.data_catalog",  # data list, data get
    "lmforge.commands.data_clean",  # data clean
    "lmforge.commands.data_prepare",  # data prepare, tokenizer train
    "lmforge.commands.generate",  # generate
    "lmforge.commands.serve",  # serve, chat
    "lmforge.commands.pretrain",  # pretrain
    "lmforge.commands.finetune",  # finetune
    "lmforge.commands.evaluate",  # evaluate, predict
    "lmforge.commands.tune",  # tune, lr-find
    "lmforge.commands.export",  # export
    "lmforge.commands.quantize",  # quantize
    "lmforge.commands.prune",  # prune
    "lmforge.commands.distill",  # distill
    "lmforge.commands.explain",  # explain
    "lmforge.commands.plan",  # plan
)
GROUPS = {
    "data": "datasets: catalog, cleaning, tokenised shards",
    "tokenizer": "tokenizers: train and inspect",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    groups = {}
    for name, help_text in GROUPS.items():
        group = commands.add_parser(name, help=help_text)
        groups[name] = group.add_subparsers(dest="subcommand", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its return value (an int) is the exit status, 0 when it returns nothing.

    A bad input is one line on stderr and status 2; Ctrl-C before a command installs its own handling (a
    training run saves a checkpoint first) is one line and status 130, as shells report SIGINT."""
    with latched():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    name = " ".join(filter(None, [args.command, getattr(args, "subcommand", None)]))
    try:
        status = args.func(args)
        return status if isinstance(status, int) else 0
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"lmforge {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
