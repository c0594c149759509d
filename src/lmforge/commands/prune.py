"""`lmforge prune MODEL --method magnitude|wanda|sparsegpt (--sparsity S | --pattern N:M) --out DIR`.

    lmforge prune SmolLM2-135M-Instruct --method wanda --sparsity 0.5 --calibration wikipedia-sample --out pruned
    lmforge prune SmolLM2-135M-Instruct --method sparsegpt --sparsity 0.5 --calibration wikipedia-sample \
        --samples 128 --dense-targets --refine-epochs 3 --out pruned-refined
    lmforge prune runs/minilm-pang-lee --method magnitude --pattern 2:4 --out minilm-2-4
    lmforge prune SmolLM2-135M-Instruct --structured ffn --amount 0.25 --calibration wikipedia-sample --out smaller
    lmforge prune SmolLM2-135M-Instruct --structured heads --amount 0.25 --importance taylor \
        --calibration wikipedia-sample --out fewer-heads

The work is `lmforge.compress.recipe.prune_checkpoint`; the folder appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lmforge.commands.convert import MODEL_HELP

METHOD_NAMES = ("magnitude", "wanda", "sparsegpt")


def register(commands, groups) -> None:
    p = commands.add_parser("prune", help="prune a model's weights (magnitude, Wanda, SparseGPT; N:M patterns)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--method", choices=METHOD_NAMES, default="magnitude", help="how weights are chosen")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of each layer's weights zeroed, in [0, 1)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured sparsity: N kept of every M (e.g. 2:4)")
    p.add_argument("--structured", choices=("heads", "ffn"), default=None, help="remove whole heads or FFN channels")
    p.add_argument("--amount", type=float, default=None, help="fraction of every layer's heads/channels removed")
    p.add_argument(
        "--importance",
        choices=("activation", "taylor", "reconstruction"),
        default=None,
        help="--structured: how units are chosen: by the least rise of the output projection's error on the "
        "calibration text, re-fitting the weights left by least squares, block by block (reconstruction, the "
        "default: structured OBS, as ZipLM; needs --samples x --seq-len >= the layer's inputs), by the norm of "
        "their output (activation), or by the first-order Taylor estimate |sum W dL/dW| of the loss change "
        "without them (taylor; causal LMs)",
    )
    p.add_argument("--calibration", default=None, help="calibration text: catalog name or file (wanda, sparsegpt)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--one-pass", action="store_true", help="calibrate all layers on the dense model in one pass")
    p.add_argument(
        "--dense-targets",
        action="store_true",
        help="sparsegpt: fit each layer to the dense model's outputs (the error of the pruned layers below "
        "included), the layers of a block in the order they run; pays from ~32k calibration tokens on",
    )
    p.add_argument(
        "--refine-epochs",
        type=int,
        default=None,
        help="wanda, sparsegpt, --structured: then train each pruned block's kept weights for N passes over the "
        "calibration text to reproduce the dense model's block outputs (block-wise reconstruction)",
    )
    p.add_argument("--refine-lr", type=float, default=3e-4, help="Adam's learning rate of --refine-epochs")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an existing model folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmforge.compress.recipe import prune_checkpoint

    start = time.perf_counter()

    def progress(block: str) -> None:  # a block at a time: SparseGPT on a 135M model takes minutes
        print(f"pruned {block} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    record = prune_checkpoint(
        args.model,
        args.out,
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        structured=args.structured,
        amount=args.amount,
        calibration=args.calibration,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        overwrite=args.overwrite,
        sequential=not args.one_pass,
        dense_targets=args.dense_targets,
        refine_epochs=args.refine_epochs,
        refine_lr=args.refine_lr,
        importance=args.importance,
        progress=progress,
    )
    summary = {k: v for k, v in record.items() if k not in ("layers", "kept", "config")}
    print(json.dumps(summary, indent=2))
    what = f"{args.structured} x {args.amount}" if args.structured else f"{args.method}, {record['target']}"
    print(f"wrote {args.out}: {record['parameters']:,} parameters ({what})", file=sys.stderr)
    if "decode_speedup_bound" in record:
        print(
            f"a batch-1 decoding step reads {record['decode_speedup_bound']:.3f}x fewer weights: the most it can "
            "gain in speed where the weights stream from memory",
            file=sys.stderr,
        )
