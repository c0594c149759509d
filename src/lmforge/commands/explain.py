"""`lmforge explain MODEL --input TEXT|FILE [--target LABEL|TOKEN] --method ig --out DIR`.

    lmforge explain runs/minilm-pang-lee/model --input "a gorgeous, witty film" --method ig --method rollout
    lmforge explain runs/gpt/model --input "The capital of France is" --method logit-lens --out explain/

MODEL is a fine-tuned classifier or tagger folder (its task.json names the labels), a causal LM, a run folder or
a .gguf file. See `lmforge.explain` for what each method computes.
"""

from __future__ import annotations

import argparse
import sys


def register(commands, groups) -> None:
    from lmforge.explain import METHODS

    parser = commands.add_parser("explain", help="attributions, attention maps, rollout, occlusion, logit lens")
    parser.add_argument("model", help="model folder, run folder or .gguf file (trained weights)")
    parser.add_argument("--input", required=True, help="a text, or a file with one text per line")
    parser.add_argument(
        "--target", default=None, help="label (classifiers) or single token (causal LMs); default: the prediction"
    )
    parser.add_argument("--position", type=int, default=None, help="token classifiers: token index explained")
    parser.add_argument("--method", action="append", choices=list(METHODS), help="repeat for several (default: ig)")
    parser.add_argument("--steps", type=int, default=50, help="integrated-gradients steps (>= 32 for 1%% completeness)")
    parser.add_argument("--out", default="explain", help="output folder (default: explain)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lmforge.explain import explain

    summary = explain(args.model, args.input, args.method or ["ig"], args.out, args.target, args.position, args.steps)
    for n, record in enumerate(summary["inputs"], start=1):
        for note in record["notes"]:
            print(f"input {n}: {note}", file=sys.stderr)
        ig = record["methods"].get("ig")
        extra = f", IG completeness error {100 * ig['completeness_error']:.2f}%" if ig else ""
        print(f"input {n}: target {record['target']!r} at token {record['position']}{extra}", file=sys.stderr)
    print(f"{args.out}/explanation.html")
