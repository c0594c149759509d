"""The GPU paths, checked and timed on one CUDA device against their peers in the same run.

Nothing here runs in CI (its machines have no GPU); run it where a GPU is lent, in one go (a few minutes on
an H100/H200). No weights or data are downloaded: models are built at known shapes with seeded random
weights, and the training text is tiny Shakespeare (--data).

1. decode: SmolLM2-135M shapes (`llama-135m`), batch 1, a 32-token prompt, --new-tokens greedy tokens, in
   bf16: eager `generate` against the compiled decode step (`compile=True`: inductor with
   mode="reduce-overhead", i.e. the step replayed as a CUDA graph), and `transformers`' `generate` on the same
   weights (saved with `save_pretrained`). Greedy tokens compiled vs eager are compared in fp32 as well
   (random weights give close logits, and bf16 rounding may flip a near tie without any bug); inductor's
   count of steps it could not capture as CUDA graphs is reported (`cudagraph_skips`).
2. batching: the serve engine's `BatchedDecoder` at 1 and --rows sequences, the same prompts, --new-tokens
   greedy steps each: aggregate tokens/s, and whether each row's tokens equal its own batch-1 run; then the
   same with the server's compiled step (fixed (rows, keys) shapes over the pool, compiled before timing;
   each replayed as a CUDA graph): its rates, its tokens against eager's, and its
   CUDA-graph skips.
3. train: the 6 x 384, block 256, batch 64 character GPT of bench_pretrain's shape (b), bf16 autocast, lmforge's
   pretraining recipe against a bare loop around `transformers.GPT2LMHeadModel` of the same shapes;
   tokens/s and MFU against the bf16 matmul peak measured here (8192^3 products).

Each part runs on its own: one that fails prints its error and the others still run. Results: --out (JSON).

    python benchmarks/bench_gpu.py [--data PATH] [--out benchmarks/results/gpu.json] [--parts decode batching train]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench_decode import decode_speed, timed
from lmforge.generate import generate
from lmforge.generate.batching import BatchedDecoder
from lmforge.models import build_model, flops_per_token
from lmforge.models.build import build_config
from lmforge.train.logging import measure_peak_flops

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_rate(run, n_new: int, repeats: int) -> dict:
    """bench_decode's figures: median time to first token and decoding tokens/s = (N - 1) / (t(N) - t(1))."""
    first, rate = decode_speed(run, n_new, repeats)
    return {"ttft_ms": round(first * 1000, 2), "tok_per_s": round(rate, 1)}


def seeded_model(args, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    return build_model(args.model).to(device=device, dtype=dtype).eval()


def part_decode(args, device: str) -> dict:
    from torch._dynamo.utils import counters

    result = {}
    vocab = build_config(args.model).vocab_size
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(4)).to(device)

    def ours(model, compile: bool):
        return lambda n: generate(model, ids, max_new_tokens=n, eos_token_id=[], compile=compile).tokens

    # fp32, matmuls in full precision: the compiled step must reproduce eager's greedy tokens
    torch.backends.cuda.matmul.allow_tf32 = False
    model = seeded_model(args, device, torch.float32)
    result["fp32_compile_s"] = round(timed(lambda: ours(model, True)(args.new_tokens)), 1)
    eager_tokens, compiled_tokens = ours(model, False)(args.new_tokens), ours(model, True)(args.new_tokens)
    result["fp32_greedy_identical"] = bool(torch.equal(eager_tokens, compiled_tokens))
    result["fp32_first_difference"] = (
        int((eager_tokens != compiled_tokens).nonzero()[0, 1]) if not result["fp32_greedy_identical"] else None
    )
    del model

    model = seeded_model(args, device, torch.bfloat16)
    result["bf16_compile_s"] = round(timed(lambda: ours(model, True)(args.new_tokens)), 1)
    eager_tokens, compiled_tokens = ours(model, False)(args.new_tokens), ours(model, True)(args.new_tokens)
    result["bf16_tokens_agree"] = float((eager_tokens == compiled_tokens).float().mean())
    result["lmforge eager"] = decode_rate(ours(model, False), args.new_tokens, args.repeats)
    result["lmforge compiled"] = decode_rate(ours(model, True), args.new_tokens, args.repeats)
    result["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])

    import transformers

    from lmforge.hf.save import save_pretrained

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(seeded_model(args, "cpu", torch.float32), Path(folder) / "hf")
        peer = transformers.AutoModelForCausalLM.from_pretrained(Path(folder) / "hf", dtype=torch.bfloat16)
    peer = peer.to(device).eval()

    def theirs(n: int) -> torch.Tensor:
        out = peer.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1] :]

    result["transformers eager"] = decode_rate(theirs, args.new_tokens, args.repeats)
    result["transformers_tokens_agree_with_eager"] = float((theirs(args.new_tokens) == eager_tokens).float().mean())
    base = result["lmforge eager"]["tok_per_s"]
    for name in ("lmforge eager", "lmforge compiled", "transformers eager"):
        rate = result[name]["tok_per_s"]
        print(f"  {name:20s} TTFT {result[name]['ttft_ms']:7.1f} ms  decode {rate:8.1f} tok/s  x{rate / base:.2f}")
    return result


def batched_run(decoder: BatchedDecoder, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], float]:
    """Prefill each prompt into its own slot, then decode n_new greedy steps for all rows at once; returns the
    tokens per row and the seconds the decode steps took."""
    slots = [decoder.pool.allocate() for _ in prompts]
    tokens = [[int(decoder.prefill(slot, p, 0).argmax())] for slot, p in zip(slots, prompts, strict=True)]
    lengths = [len(p) for p in prompts]
    sync()
    start = time.perf_counter()
    for _ in range(n_new - 1):
        logits = decoder.decode(slots, lengths, [row[-1] for row in tokens])
        for row, token in zip(tokens, logits.argmax(-1).tolist(), strict=True):
            row.append(token)
        lengths = [n + 1 for n in lengths]
    sync()
    elapsed = time.perf_counter() - start
    for slot in slots:
        decoder.pool.release(slot)
    return tokens, elapsed


def part_batching(args, device: str) -> dict:
    model = seeded_model(args, device, torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (32,), generator=generator).tolist() for _ in range(args.rows)]
    decoder = BatchedDecoder(model, args.rows, 32 + args.new_tokens)
    batched_run(decoder, prompts[:1], 4)  # warm-up, one row and several
    batched_run(decoder, prompts[:2], 4)
    alone = [batched_run(decoder, [p], args.new_tokens) for p in prompts]
    together, seconds = batched_run(decoder, prompts, args.new_tokens)
    one_row = (args.new_tokens - 1) / statistics.median(s for _, s in alone)
    many = args.rows * (args.new_tokens - 1) / seconds
    same = sum(row == solo for row, (solo_rows, _) in zip(together, alone, strict=True) for solo in solo_rows)
    print(f"  batch 1: {one_row:.1f} tok/s; batch {args.rows}: {many:.1f} tok/s aggregate (x{many / one_row:.1f})")
    print(f"  rows whose batched tokens equal their batch-1 tokens: {same}/{args.rows}")
    result = {"batch1_tok_per_s": round(one_row, 1), f"batch{args.rows}_tok_per_s": round(many, 1),
              "rows_equal_to_alone": same, "rows": args.rows}  # fmt: skip
    if args.skip_compiled_batching:
        return result
    result["compiled"] = compiled_batching(args, model, prompts, together)
    return result


def compiled_batching(args, model, prompts: list[list[int]], eager_rows: list[list[int]]) -> dict:
    """The server's compiled step (`BatchedDecoder(compile=True)`: fixed (rows, keys) shapes over the slot pool,
    each replayed as a CUDA graph). The shapes of batch 1 and --rows are compiled and recorded first (a server
    compiles every shape before it listens, `warm_up`; here only those timed); then batch 1 and --rows against
    the eager figures above, the batched tokens against eager's, and inductor's count of steps it could not
    capture as CUDA graphs (0 expected: the pool's buffers are static)."""
    from torch._dynamo.utils import counters

    counters.clear()
    decoder = BatchedDecoder(model, args.rows, 32 + args.new_tokens, compile=True)
    start = time.perf_counter()
    for rows in ([prompts[0]], prompts, [prompts[0]], prompts):  # compiles (1, K) and (--rows, K); then records
        batched_run(decoder, rows, args.new_tokens)  # their CUDA graphs (inductor records at the second replay)
    compile_s = time.perf_counter() - start
    graphs = len(decoder.ready)
    alone = [batched_run(decoder, [p], args.new_tokens) for p in prompts[: min(4, len(prompts))]]
    together, seconds = batched_run(decoder, prompts, args.new_tokens)
    one_row = (args.new_tokens - 1) / statistics.median(s for _, s in alone)
    many = args.rows * (args.new_tokens - 1) / seconds
    pairs = [(a, b) for row, eager in zip(together, eager_rows, strict=True) for a, b in zip(row, eager, strict=True)]
    agree = sum(a == b for a, b in pairs) / len(pairs)
    skips = int(counters["inductor"]["cudagraph_skips"])
    print(f"  compiled: {graphs} shapes in {compile_s:.0f} s; batch 1: {one_row:.1f} tok/s; batch {args.rows}: "
          f"{many:.1f} tok/s aggregate (x{many / one_row:.1f}); tokens equal to eager's {agree:.3f}; "
          f"cudagraph skips {skips}")  # fmt: skip
    return {"shapes_compiled": graphs, "compile_s": round(compile_s, 1), "batch1_tok_per_s": round(one_row, 1),
            f"batch{args.rows}_tok_per_s": round(many, 1), "tokens_equal_to_eager": round(agree, 4),
            "cudagraph_skips": skips}  # fmt: skip


def part_train(args, device: str) -> dict:
    import bench_pretrain as bp
    from lmforge.pretrain.config import parse_args
    from lmforge.pretrain.trainer import pretrain

    text = Path(args.data).read_text(encoding="utf-8")
    train_ids, _, vocab = bp.nanogpt_split(text)
    shape = bp.SHAPES[args.train_shape]
    peak = measure_peak_flops(torch.bfloat16, size=8192, seconds=2.0, device=device)
    flops = flops_per_token(
        build_model("gpt", n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"],
                    vocab_size=len(vocab), max_seq_len=shape["block"]),
        shape["block"],
    )  # fmt: skip
    result = {"bf16_peak_tflops": round(peak / 1e12, 1)}
    torch.manual_seed(0)
    peer_rate, _ = bp.peer_loop(bp.hf_model(shape, len(vocab)), train_ids, shape, "bfloat16",
                                steps=args.train_steps + 1, device=device)  # fmt: skip
    result["transformers loop"] = {"tok_per_s": round(peer_rate), "mfu": round(peer_rate * flops / peak, 4)}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "train.txt").write_text(text[: int(len(text) * 0.9)], encoding="utf-8")
        for name, extra in (("lmforge", {}), ("lmforge compiled", {"train.compile": True})):
            flags = bp.lmforge_flags(shape, out, "bfloat16", args.train_steps + 10, name.replace(" ", "-"), extra,
                                     device=device)  # fmt: skip
            pretrain(parse_args(flags))
            ours = bp.lmforge_tokens_per_s(out / name.replace(" ", "-"))
            result[name] = {"tok_per_s": round(ours), "mfu": round(ours * flops / peak, 4)}
    for name in ("transformers loop", "lmforge", "lmforge compiled"):
        rate = result[name]["tok_per_s"]
        print(f"  {name:18s} {rate:12,} tok/s  MFU {result[name]['mfu']:6.1%}  x{rate / peer_rate:.2f} of the peer")
    return result


PARTS = {"decode": part_decode, "batching": part_batching, "train": part_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama-135m", help="the decoder preset of parts decode and batching")
    parser.add_argument("--data", default=str(DATA), help="tiny Shakespeare's input.txt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--skip-compiled-batching", action="store_true", help="batching: the eager engine only")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-shape", default="b", choices=["a", "b"], help="bench_pretrain's shape sets")
    parser.add_argument("--out", default=str(ROOT / "results" / "gpu.json"))
    args = parser.parse_args()
    results = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(results))
    for name in args.parts:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            results[name] = PARTS[name](args, args.device)
        except Exception as error:  # one part's failure is a finding; the others still run
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"   ({results[name]['seconds']} s)", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
