"""`lmforge export MODEL --to FORMAT --out PATH`: a model in a format another runtime loads.

Each format is one entry of `FORMATS` (format name -> the function that runs it with the parsed arguments and
returns a summary line); the work happens in `lmforge.export`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lmforge.commands.convert import MODEL_HELP


def export_gguf(args: argparse.Namespace) -> str:
    from lmforge.export.gguf import export_gguf_file

    return export_gguf_file(args.model, args.out, args.type, args.overwrite)


FORMATS: dict[str, Callable[[argparse.Namespace], str]] = {
    "gguf": export_gguf,  # llama.cpp, ollama: llama and gpt families
}


def cmd_export(args: argparse.Namespace) -> None:
    print(FORMATS[args.to](args))


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser("export", help="export a model for another runtime (GGUF for llama.cpp and ollama)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--to", choices=sorted(FORMATS), required=True, help="output format")
    p.add_argument("--out", required=True, help="output file (.gguf), written atomically")
    p.add_argument(
        "--type",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        default="f16",
        help="GGUF tensor type of the 2-D weights (default: f16; norms and biases stay f32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)
