"""`lmforge export MODEL --to FORMAT --out PATH`: a model in a format another runtime reads.

    lmforge export SmolLM2-135M-Instruct --to gguf --type q8_0 --out smollm2-q8_0.gguf
    lmforge export runs/minilm-pang-lee/model --to onnx --out minilm-onnx [--quantize int8] [--overwrite]

MODEL is anything `lmforge.hf.resolve` accepts (a preset exports its random weights). Each format is one entry of
`FORMATS`, a function of the parsed arguments that writes the output and returns the line to print; a flag that
belongs to another format is refused rather than ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def export_gguf(args: argparse.Namespace) -> str:
    """One GGUF file for llama.cpp and ollama (`lmforge.export.gguf`): llama and gpt families."""
    from lmforge.export.gguf import export_gguf_file

    if args.quantize is not None:
        raise ValueError("--quantize is for --to onnx; a GGUF file's weight type is --type (q8_0, q4_0, ...)")
    return export_gguf_file(args.model, args.out, args.type or "f16", args.overwrite)


def export_onnx_format(args: argparse.Namespace) -> str:
    """ONNX graphs for onnxruntime (`lmforge.export.onnx`), run by `lmforge generate|evaluate|predict OUT`."""
    from lmforge.export.onnx import export_onnx, read_manifest, report
    from lmforge.hf.files import check_destination
    from lmforge.hf.resolve import ONNX_MANIFEST

    if args.type is not None:
        raise ValueError("--type is for --to gguf; an ONNX export is fp32, or int8 with --quantize int8")
    if args.quantize not in (None, "int8"):
        raise ValueError(f"--quantize {args.quantize} is not supported for onnx; choose int8 (or leave it out)")
    check_destination(args.out, args.overwrite, marker=ONNX_MANIFEST)  # before the minutes of loading and tracing
    model, source = load_for_export(args.model)
    export_onnx(model, args.out, source=source, quantize=args.quantize, overwrite=args.overwrite)
    return report(args.out, read_manifest(args.out))


def load_for_export(name: str):
    """(model in fp32, the folder or file it came from, None for a preset)."""
    from lmforge.hf.resolve import resolve_model

    source = resolve_model(name)
    if source.kind == "onnx":
        raise ValueError(f"{name} is already an ONNX export; export the model it was made from")
    if source.path is None:
        from lmforge.models import build_model

        return build_model(name), None
    from lmforge.hf.load import load_model

    return load_model(source.path, dtype="float32"), source.path


FORMATS: dict[str, Callable[[argparse.Namespace], str]] = {
    "gguf": export_gguf,  # llama.cpp, ollama: llama and gpt families
    "onnx": export_onnx_format,  # onnxruntime: every family and head
}


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmforge.io import write_errors_explained

    args.out = Path(args.out)
    with write_errors_explained(args.out):
        print(FORMATS[args.to](args))


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser(
        "export", help="export a model for another runtime (gguf: llama.cpp and ollama; onnx: onnxruntime)"
    )
    p.add_argument(
        "model",
        help="preset (random weights), real model name, lmforge or Hugging Face folder, checkpoint, run folder "
        "(its fine-tuned model) or .gguf file",
    )
    p.add_argument("--to", required=True, choices=sorted(FORMATS), help="output format")
    p.add_argument("--out", required=True, help="output: a .gguf file, or a folder (onnx); written whole or not at all")
    p.add_argument(
        "--type",
        choices=GGUF_TYPES,
        default=None,
        help="gguf: tensor type of the 2-D weights (default f16; norms and biases stay f32)",
    )
    p.add_argument("--quantize", default=None, help="onnx: int8 (onnxruntime's dynamic quantisation of the graph)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (an earlier export)")
    p.set_defaults(func=cmd_export)
