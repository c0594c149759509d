"""Batch-1 decoding: the compiled decode step against eager decoding, and against llama.cpp, on SmolLM2-135M.

Claim: `generate(..., compile=True)` decodes faster than `compile=False` at batch 1 (where a step of a small
model is mostly per-op dispatch, not arithmetic), with the same greedy tokens. The named peer is llama.cpp
(`llama_cpp`, the Python binding) on the same GGUF file when it is installed; the script says so when it is not.

Each figure is the median over --repeats runs: time to first token (a run of 1 new token), and decoding
tokens/s = (N - 1) / (time of N tokens - time to first token). The first compiled run compiles (or loads the
graph from inductor's on-disk cache); its time is reported apart and left out of the medians.

A torch.profiler summary of --profile-steps decode steps, top ops by self CPU time, eager then compiled,
goes to benchmarks/results/decode_profile.txt (where the time went before and after).

    python benchmarks/bench_decode.py [--model SmolLM2-135M-Instruct] [--new-tokens 64] [--prompt-len 32]
                                      [--repeats 3] [--threads 2] [--profile-steps 16] [--weights int8|fp32]
    python benchmarks/bench_decode.py --model llama-tiny --new-tokens 4 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lmforge.commands.generate import load_model_and_tokenizer
from lmforge.generate import generate, prepare_for_decoding
from lmforge.nn.quant import quantize_int8
from lmforge.quantize import quantize_model

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    """Seconds fn() took; on a GPU, until its queued kernels have run."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def decode_speed(run, n_new: int, repeats: int) -> tuple[float, float]:
    """(time to first token in s, decoding tokens/s) for run(n) generating n tokens; medians of `repeats`."""
    first = statistics.median(timed(lambda: run(1)) for _ in range(repeats))
    full = statistics.median(timed(lambda: run(n_new)) for _ in range(repeats))
    return first, (n_new - 1) / (full - first) if full > first else float("nan")  # nan: too few tokens to tell


def lmforge_runner(model, ids: torch.Tensor, compile: bool):
    def run(n: int) -> torch.Tensor:
        return generate(model, ids, max_new_tokens=n, eos_token_id=[], compile=compile).tokens

    return run


def llama_cpp_runner(gguf_path: Path, ids: torch.Tensor, threads: int):
    """llama.cpp on the same GGUF and prompt ids, greedy; None when `llama_cpp` is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=512, verbose=False)
    prompt = ids[0].tolist()

    def run(n: int) -> None:
        llm.reset()
        for produced, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
            if produced == n:
                break

    return run


def profile_steps(model, ids: torch.Tensor, n_steps: int, compile: bool) -> str:
    """The profiler's table of one generation of n_steps tokens, its prompt included (warm: the step is
    compiled beforehand)."""
    generate(model, ids, max_new_tokens=n_steps, eos_token_id=[], compile=compile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, ids, max_new_tokens=n_steps, eos_token_id=[], compile=compile)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def gguf_file(name: str) -> Path | None:
    from lmforge.hf.resolve import resolve_model

    path = resolve_model(name).path
    if path is None:
        return None
    path = Path(path)
    return path if path.suffix == ".gguf" else next(path.rglob("*.gguf"), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a model name, folder or preset")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument(
        "--weights",
        choices=["fp32", "int8", "int4"],
        default="int8",
        help="int8: weight-only (what auto compiles on CPU); int4: the blocks' Linears in 4 bits (groups of 32, "
        "round-to-nearest: SmolLM2's Q4_1 grid) on lmforge's int4 kernel, the output projection int8",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(args.model, None)
    model = model.float().eval()
    if args.weights == "int4":
        quantize_model(model, "int4", group_size=32)
    model = prepare_for_decoding(quantize_int8(model) if args.weights != "fp32" else model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(4))

    eager, compiled = lmforge_runner(model, ids, False), lmforge_runner(model, ids, True)
    compile_time = timed(lambda: compiled(args.new_tokens))
    same = torch.equal(eager(args.new_tokens), compiled(args.new_tokens))
    print(
        f"{args.model} ({args.weights} weights): batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"{args.threads} threads"
    )
    print(f"first compiled run (compiles, or loads inductor's disk cache): {compile_time:.1f} s")
    print(f"greedy tokens identical, compiled vs eager: {same}")
    results = {"lmforge eager": decode_speed(eager, args.new_tokens, args.repeats)}
    results["lmforge compiled"] = decode_speed(compiled, args.new_tokens, args.repeats)
    gguf = gguf_file(args.model)
    peer = llama_cpp_runner(gguf, ids, args.threads) if gguf is not None else None
    if peer is not None:
        results["llama.cpp"] = decode_speed(peer, args.new_tokens, args.repeats)
    base = results["lmforge eager"][1]
    for name, (first, speed) in results.items():
        print(f"  {name:18s} TTFT {first * 1000:8.1f} ms  decode {speed:8.1f} tok/s  x{speed / base:.2f} of eager")
    if peer is None:
        print(f"  llama.cpp: not run ({'llama_cpp is not installed' if gguf is not None else 'no GGUF file'})")
    else:
        print(f"compiled / llama.cpp decode: {results['lmforge compiled'][1] / results['llama.cpp'][1]:.2f}")

    report = [
        f"{args.model} ({args.weights} weights), batch 1, prompt {args.prompt_len}, {args.profile_steps} decode steps, "
        f"{args.threads} threads, top ops by self CPU"
    ]
    for name, flag in (("before: eager", False), ("after: compiled", True)):
        report += ["", f"== {name} ==", profile_steps(model, ids, args.profile_steps, flag)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_profile.txt").write_text("\n".join(report) + "\n")
    print(f"profiles: {RESULTS / 'decode_profile.txt'}")


if __name__ == "__main__":
    main()
