"""Forward + backward tokens/s: lmforge's GPT against transformers' GPT2LMHeadModel, same shapes.

Both models are built in this process with identical shapes and weights (checked: same loss), fp32, the
same thread count, dropout off, transformers' fast GELU (`activation_function="gelu_pytorch_tanh"`) and its
default SDPA attention. Steps alternate between the two models so machine noise hits both alike; each
figure is the median step. Target: ratio >= 1.0 (lmforge never slower).

    python benchmarks/bench_model.py [--steps N] [--threads T] [--shapes gpt2-124M shakespeare-char]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge import build_model
from lmforge.hf import ADAPTERS

SHAPES = {
    # name: (n_layer, n_head, d_model, vocab_size, block_size, batch_size)
    "gpt2-124M": (12, 12, 768, 50257, 1024, 1),
    "shakespeare-char": (6, 6, 384, 65, 256, 8),
}


def step_seconds(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def bench_shape(name: str, steps: int) -> dict:
    n_layer, n_head, d_model, vocab, block, batch = SHAPES[name]
    torch.manual_seed(0)
    ours = build_model(
        "gpt",
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        vocab_size=vocab,
        max_seq_len=block,
        dropout=0.0,
    ).train()
    theirs = GPT2LMHeadModel(
        GPT2Config(
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=d_model,
            vocab_size=vocab,
            n_positions=block,
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).train()
    ours.load_state_dict(ADAPTERS["gpt"].state_dict_from_hf(theirs.state_dict(), ours.config))  # identical weights
    input_ids = torch.randint(0, vocab, (batch, block), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_gap = abs(ours(input_ids, labels=input_ids).loss - theirs(input_ids, labels=input_ids).loss).item()
    assert loss_gap < 1e-4, f"the two models disagree (loss gap {loss_gap:.2e}); the comparison would be unfair"
    for model in (ours, theirs):  # warm up allocator and kernels
        step_seconds(model, input_ids)
    times = {"lmforge": [], "transformers": []}
    for _ in range(steps):
        times["lmforge"].append(step_seconds(ours, input_ids))
        times["transformers"].append(step_seconds(theirs, input_ids))
    tokens = batch * block
    ours_tps = tokens / statistics.median(times["lmforge"])
    theirs_tps = tokens / statistics.median(times["transformers"])
    return {"shape": name, "lmforge": ours_tps, "transformers": theirs_tps, "ratio": ours_tps / theirs_tps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, forward + backward, median of {args.steps} steps")
    print(f"{'shape':<18}{'lmforge tok/s':>15}{'transformers tok/s':>20}{'ratio':>8}")
    for name in args.shapes:
        r = bench_shape(name, args.steps)
        print(f"{r['shape']:<18}{r['lmforge']:>15,.0f}{r['transformers']:>20,.0f}{r['ratio']:>7.2f}x")


if __name__ == "__main__":
    main()
