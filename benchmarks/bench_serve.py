"""Serving throughput and latency: 1 client against 16 concurrent clients of `lmforge serve`, the official
`openai` client, streaming and not.

Claim: continuous batching turns concurrent requests into one batched forward per step, so 16 clients get
many times the aggregate tokens/s of one client while each one's inter-token latency grows far less than 16x
(a batch-1 step is bound by streaming the weights, which a batch of 16 shares).

`lmforge serve MODEL` runs as a subprocess on a free port (--concurrency 16, so all 16 decode in one batch).
Each request is a chat completion of exactly --max-tokens tokens (`ignore_eos`, lmforge's extension), greedy.
Per setting: aggregate tokens/s = completion tokens of all requests / wall time from the first request sent
to the last answer; median inter-token latency (streaming only) = the median gap between content chunks,
over all requests. Ratios are 16 clients over 1 client. Results go to benchmarks/results/serve.json.

    python benchmarks/bench_serve.py [--model SmolLM2-135M-Instruct] [--max-tokens 64] [--clients 16]
                                     [--dtype bfloat16|float32] [--quantize none|int8] [--threads 2]
                                     [--compile auto|on|off] [--out benchmarks/results/serve.json]
    python benchmarks/bench_serve.py --model llama-tiny --max-tokens 8 --clients 4   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def start_server(model: str, clients: int, max_tokens: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """The server process and its base URL, once it prints the address it listens on."""
    command = [sys.executable, "-m", "lmforge", "serve", model, "--port", "0", "--seed", "0", *extra]
    command += ["--concurrency", str(clients), "--max-tokens-limit", str(max_tokens), "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        found = re.search(r"on (http://[\d.]+:\d+)", line)
        if found:  # keep reading its log, or the pipe fills and the server blocks on a write
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, found.group(1)
    raise RuntimeError(f"lmforge serve exited ({process.wait()}) before listening")


def one_request(client: openai.OpenAI, model: str, max_tokens: int, streaming: bool) -> tuple[int, list[float]]:
    """(completion tokens, gaps in seconds between content chunks) of one chat completion."""
    options = dict(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    if not streaming:
        return client.chat.completions.create(**options).usage.completion_tokens, []
    stamps, tokens = [], 0
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options):
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return tokens, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def measure(client: openai.OpenAI, model: str, n_clients: int, max_tokens: int, streaming: bool) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        answers = list(pool.map(lambda _: one_request(client, model, max_tokens, streaming), range(n_clients)))
    wall = time.perf_counter() - start
    gaps = [gap for _, request_gaps in answers for gap in request_gaps]
    tokens = sum(n for n, _ in answers)
    return {
        "clients": n_clients,
        "completion_tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "median_inter_token_ms": statistics.median(gaps) * 1000 if gaps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a model name, folder or preset")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="serve's --dtype")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="serve's --quantize")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads (OMP_NUM_THREADS)")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="serve's --compile / --no-compile"
    )
    parser.add_argument("--out", default=str(RESULTS / "serve.json"), help="results JSON")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    extra = ["--dtype", args.dtype, "--quantize", args.quantize]
    extra += {"auto": [], "on": ["--compile"], "off": ["--no-compile"]}[args.compile]
    extra += ["--compile-warmup", str(args.max_tokens + 64)]  # the chat prompt is < 64 tokens
    process, url = start_server(args.model, args.clients, args.max_tokens, extra)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        name = client.models.list().data[0].id
        # warm-up: first-call costs out of the figures. With a compiled step the server compiles every graph
        # (batch x keys bucket) the runs can meet before its first request (--compile-warmup; ~1.5 min a graph
        # the first time, from the disk cache after), so the first request waits for that
        for streaming in (False, True):
            measure(client, name, 1, args.max_tokens, streaming)
            measure(client, name, args.clients, args.max_tokens, streaming)
        results = {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "dtype": args.dtype,
            "quantize": args.quantize,
            "threads": args.threads,
            "compile": args.compile,
        }
        for streaming in (False, True):
            alone = measure(client, name, 1, args.max_tokens, streaming)
            together = measure(client, name, args.clients, args.max_tokens, streaming)
            key = "streaming" if streaming else "non_streaming"
            results[key] = {"1_client": alone, f"{args.clients}_clients": together}
            gain = together["tokens_per_s"] / alone["tokens_per_s"]
            results[key]["aggregate_tokens_per_s_ratio"] = gain
            line = f"{key:13s} aggregate tok/s: 1 client {alone['tokens_per_s']:7.1f}, "
            line += f"{args.clients} clients {together['tokens_per_s']:7.1f} (x{gain:.2f})"
            if streaming:
                ratio = together["median_inter_token_ms"] / alone["median_inter_token_ms"]
                results[key]["median_inter_token_latency_ratio"] = ratio
                line += f"; median inter-token latency {alone['median_inter_token_ms']:.1f} -> "
                line += f"{together['median_inter_token_ms']:.1f} ms (x{ratio:.2f})"
            print(line)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # still compiling its warm-up graphs
            process.kill()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
