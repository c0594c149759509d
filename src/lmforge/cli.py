"""The `lmforge` command. Each subcommand is a thin function that parses its arguments and calls the library;
the subcommands live in `lmforge.commands`, one module per group."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge import __version__

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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        name = " ".join(filter(None, [args.command, getattr(args, "subcommand", None)]))
        print(f"lmforge {name}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
