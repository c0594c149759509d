"""`lmforge convert` and `lmforge inspect`: checkpoints between formats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_HELP = (
    "Hugging Face or lmforge folder, checkpoint, run folder (its best checkpoint), .gguf file or real model name"
)


def cmd_convert(args: argparse.Namespace) -> None:
    from lmforge.hf.load import load_model
    from lmforge.hf.resolve import resolve_model
    from lmforge.hf.runs import is_sharded
    from lmforge.hf.save import save_model, save_pretrained

    src = resolve_model(args.src, presets=False).path  # a run folder: its best checkpoint, tokenizer included
    if is_sharded(src):  # an FSDP/TP run's checkpoint: gather every rank's shards into one model
        from lmforge.hf.load import resolve_dtype
        from lmforge.train.sharded import load_sharded_model

        model = load_sharded_model(src, head=args.head, dtype=resolve_dtype(args.dtype))
    else:
        model = load_model(src, head=args.head, dtype=args.dtype)
    tokenizer = source_tokenizer(src)
    save = save_pretrained if args.to == "hf" else save_model
    save(model, args.dst, tokenizer=tokenizer, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters())
    what = "weights and tokenizer" if tokenizer is not None else "weights only (no tokenizer)"
    c = model.config
    print(f"wrote {args.dst}: {args.to} format, {c.family}, head={c.head}, {params:,} parameters, {what}")


def source_tokenizer(src: Path):
    """The source's tokenizer (files in its folder, or the vocabulary inside a GGUF), or None when it has
    none or lmforge cannot rebuild it (said on stderr: the weights are still converted)."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    if src.is_dir() and not any((src / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        return None
    try:
        return load_tokenizer(src)
    except ValueError as error:
        print(f"lmforge convert: warning: tokenizer not converted: {error}", file=sys.stderr)
        return None


def cmd_inspect(args: argparse.Namespace) -> None:
    from lmforge.hf.describe import describe_checkpoint

    info = describe_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"path:       {info['path']}")
    print(f"format:     {info['format']}")
    print(f"family:     {info['family'] or 'unknown (not loadable by lmforge)'}")
    print(f"parameters: {info['parameters']:,}")
    print(f"dtypes:     {', '.join(f'{d} ({n} tensors)' for d, n in info['dtypes'].items())}")
    print("config:")
    for key, value in info["config"].items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        print(f"  {key}: {text[:200]}")
    print(f"tensors ({len(info['tensors'])}):")
    width = max((len(t["name"]) for t in info["tensors"]), default=0)
    for t in info["tensors"]:
        print(f"  {t['name']:<{width}}  {t['dtype']:<8}  {tuple(t['shape'])}")


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser(
        "convert",
        help="convert a checkpoint (HF folder, lmforge folder, .gguf, a sharded FSDP/TP checkpoint) to a HF or "
        "lmforge folder",
    )
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--to", choices=["hf", "lmforge"], default="hf", help="output format (default: hf)")
    p.add_argument("--head", default=None, help="task head to load with (default: the checkpoint's)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: as stored")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is an existing checkpoint folder")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("inspect", help="show a checkpoint's family, config, size, dtypes and tensors")
    p.add_argument("path", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=cmd_inspect)
