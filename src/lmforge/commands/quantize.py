"""`lmforge quantize MODEL --method int8|int4 --out DIR`: a weight-only quantised copy of a model, by
round-to-nearest or, with --gptq, GPTQ on calibration text (`lmforge.quantize`)."""

from __future__ import annotations

import argparse

from lmforge.commands.convert import MODEL_HELP


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.quantize import quantize_checkpoint

    print(
        quantize_checkpoint(
            args.model,
            args.out,
            args.method,
            group_size=args.group_size,
            use_gptq=args.gptq,
            calibration=args.calibration,
            samples=args.samples,
            seq_len=args.seq_len,
            act_order=args.act_order,
            grid=args.grid,
            overwrite=args.overwrite,
        )
    )


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser("quantize", help="weight-only int8 / int4 quantisation (round-to-nearest or GPTQ)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--method", choices=["int8", "int4"], required=True, help="int8 per channel, int4 per group")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default) or 128")
    p.add_argument("--gptq", action="store_true", help="GPTQ (Frantar et al. 2022) instead of round-to-nearest")
    p.add_argument("--calibration", default=None, help="text file GPTQ runs through the model")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences (default: 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    p.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPTQ visits inputs by decreasing Hessian diagonal (default: on; --no-act-order for natural order)",
    )
    p.add_argument(
        "--grid",
        choices=["minmax", "mse"],
        default=None,
        help="int4 group grid: the group's [min, max], or that range shrunk to the least squared rounding "
        "error (default: mse with --gptq, minmax without: the better of each, measured)",
    )
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a model folder")
    p.set_defaults(func=cmd_quantize)
