"""SmolLM2-135M-Instruct exported to GGUF by `lmforge export`, run by llama.cpp (`llama-cpp-python`, the
`oracles` extra): are llama.cpp's greedy tokens lmforge's, and how fast does llama.cpp decode our q8_0 and q4_0
files next to the original Q4_1 file the weights come from?

For f32 and f16: 64 greedy tokens of llama.cpp and of lmforge (`load_model` on the same file) after the same
chat prompt, compared token by token. Decoding: llama.cpp at --threads threads, batch 1, greedy, tokens/s
over the new tokens after the first (median of --repeats), for our f16, q8_0, q4_0 files and the original.

    nice -n 10 .venv/bin/python benchmarks/bench_gguf.py [--threads 2] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.data.tokenizers.tokenizer import load_tokenizer
from lmforge.export.gguf import export_gguf_file
from lmforge.hf.load import load_model
from lmforge.hf.real_weights import smollm2_instruct_gguf

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@torch.no_grad()
def lmforge_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    model, prompt, out = load_model(path, dtype=torch.float32), torch.tensor([ids]), []
    for _ in range(n):
        token = int(model(prompt).logits[0, -1].argmax())
        out.append(token)
        prompt = torch.cat([prompt, torch.tensor([[token]])], dim=1)
    return out


def llama_cpp_run(path: Path, ids: list[int], n: int, threads: int) -> tuple[list[int], float]:
    """(n greedy tokens, decode tokens/s after the first) of llama.cpp on `path`."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False, seed=0)
    out, stamps = [], []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        stamps.append(time.perf_counter())
        if len(out) == n:
            break
    return out, (n - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gguf.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original = smollm2_instruct_gguf()
    tokenizer = load_tokenizer(original)
    ids = tokenizer.encode(tokenizer.apply_chat_template(PROMPT))
    result: dict = {"threads": args.threads, "new_tokens": args.new_tokens, "identical": {}, "llama_cpp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for gguf_type in ("f32", "f16", "q8_0", "q4_0"):
            files[gguf_type] = Path(tmp) / f"smollm2-{gguf_type}.gguf"
            print(export_gguf_file("SmolLM2-135M-Instruct", files[gguf_type], gguf_type), flush=True)
        for gguf_type in ("f32", "f16"):
            ours = lmforge_greedy(files[gguf_type], ids, args.new_tokens)
            theirs, _ = llama_cpp_run(files[gguf_type], ids, args.new_tokens, args.threads)
            same = sum(a == b for a, b in zip(ours, theirs, strict=True))
            print(f"{gguf_type}: {same}/{args.new_tokens} greedy tokens identical (llama.cpp vs lmforge)", flush=True)
            result["identical"][gguf_type] = same
        files["original Q4_1"] = original
        for label in ("f16", "q8_0", "q4_0", "original Q4_1"):
            path = files[label]
            speeds = [llama_cpp_run(path, ids, args.new_tokens, args.threads)[1] for _ in range(args.repeats)]
            size = path.stat().st_size / 2**20
            print(f"llama.cpp {label:<14} {size:6.1f} MiB  {statistics.median(speeds):7.1f} tok/s", flush=True)
            result["llama_cpp"][label] = {"mib": size, "decode_tok_s": statistics.median(speeds), "runs": speeds}
    import llama_cpp

    result["llama_cpp_python"] = llama_cpp.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
