"""Near-deduplication against datasketch (`pip install datasketch`), the usual Python MinHash/LSH library.

On a synthetic corpus of random 300-word documents plus copies with 3 words changed (J ~ 0.9), both
find the planted near-duplicates; this prints documents per second for each and the ratio, and the mean
absolute error of each one's Jaccard estimate against the exact Jaccard of the 5-gram shingle sets.

    .venv/bin/python benchmarks/bench_clean.py [--docs 2000]
"""

from __future__ import annotations

import argparse
import random
import re
import time

import numpy as np

from lmforge.data.cleaning.dedup import MinHasher, NearDeduplicator, estimated_jaccard, exact_jaccard


def corpus(n: int, seed: int = 0) -> tuple[list[str], int]:
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(20_000)]
    originals = [rng.choices(vocab, k=300) for _ in range(n)]
    copies = []
    for words in originals[: n // 4]:
        copy = list(words)
        for pos in rng.sample(range(300), 3):
            copy[pos] = "changed"
        copies.append(copy)
    texts = [" ".join(w) for w in originals + copies]
    rng.shuffle(texts)
    return texts, len(copies)


def shingles(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def run_lmforge(texts: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    dedup = NearDeduplicator(num_perm=128, bands=32, threshold=0.8)
    removed = sum(dedup.is_duplicate(t) for t in texts)
    return removed, time.perf_counter() - start


def run_datasketch(texts: list[str]) -> tuple[int, float]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    removed = 0
    for i, text in enumerate(texts):
        m = MinHash(num_perm=128)
        m.update_batch([s.encode() for s in shingles(text)])
        if lsh.query(m):
            removed += 1
        else:
            lsh.insert(str(i), m)
    return removed, time.perf_counter() - start


def estimate_errors(texts: list[str], pairs: int = 200) -> tuple[float, float]:
    from datasketch import MinHash

    rng = random.Random(1)
    ours, theirs = [], []
    hasher = MinHasher(num_perm=128)
    for _ in range(pairs):
        a = texts[rng.randrange(len(texts))].split()
        b = a[: rng.randrange(300)] + texts[rng.randrange(len(texts))].split()[:150]
        a, b = " ".join(a), " ".join(b)
        exact = exact_jaccard(shingles(a), shingles(b))
        ours.append(abs(estimated_jaccard(hasher.signature(a), hasher.signature(b)) - exact))
        ma, mb = MinHash(num_perm=128), MinHash(num_perm=128)
        ma.update_batch([s.encode() for s in shingles(a)])
        mb.update_batch([s.encode() for s in shingles(b)])
        theirs.append(abs(ma.jaccard(mb) - exact))
    return float(np.mean(ours)), float(np.mean(theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    args = parser.parse_args()
    texts, planted = corpus(args.docs)
    ours_removed, ours_s = run_lmforge(texts)
    theirs_removed, theirs_s = run_datasketch(texts)
    ours_err, theirs_err = estimate_errors(texts)
    print(f"{len(texts)} documents, {planted} planted near-duplicates (k=128, threshold 0.8)")
    for name, removed, seconds, error in (
        ("lmforge", ours_removed, ours_s, ours_err),
        ("datasketch", theirs_removed, theirs_s, theirs_err),
    ):
        print(f"{name:11s} removed {removed:5d}  {len(texts) / seconds:8.0f} docs/s  mean |J_est - J| {error:.4f}")
    print(f"speed ratio lmforge / datasketch: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
