"""Exact and near-duplicate detection over a stream of documents, keeping the first of each cluster.

**Exact**: a 128-bit BLAKE2b digest of the (already normalised) text; a document whose digest was seen
before is dropped. Memory: one 16-byte digest per kept document (~90 bytes with the set's overhead).

**Near (MinHash + LSH)**, after Broder 1997 and Leskovec, Rajaraman & Ullman, *Mining of Massive
Datasets*, ch. 3:

- A document becomes a set S of shingles: word n-grams (default 5 words, lower-cased, punctuation
  dropped, as in Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better") or
  character n-grams. Each shingle is hashed to an integer x < p, p = 2^31 - 1 (a Mersenne prime).
- k hash functions h_i(x) = (a_i x + b_i) mod p, with a_i in [1, p) and b_i in [0, p) drawn at random,
  form a universal family that behaves like k random permutations of [0, p). The signature is
  sig_i(S) = min_{x in S} h_i(x). For two sets, P[sig_i(A) = sig_i(B)] = J(A, B) = |A n B| / |A u B|,
  so the fraction of equal signature entries estimates the Jaccard similarity with standard error
  sqrt(J(1 - J) / k). (a_i x + b_i < 2^62 + 2^31, so uint64 arithmetic is exact.)
- LSH: the k = b * r entries are cut into b bands of r rows; two documents become candidates when
  all r rows of at least one band agree, which happens with probability 1 - (1 - J^r)^b. That S-curve
  rises steepest near J ~ (1/b)^(1/r) (`lsh_threshold`). Defaults: k = 128, b = 32, r = 4, so the curve
  sits at ~0.42 and a pair with J = 0.8 is a candidate with probability 1 - 5e-8. Each candidate is
  then checked: the document is a duplicate when the signatures agree on at least `threshold` (0.8, the
  Jaccard cut-off of Lee et al. 2022 and of Gopher) of their entries. `threshold=0` skips the check and
  trusts the S-curve alone.

Memory: only kept documents are indexed, each costing its signature (4k bytes) plus b bucket entries
(~75 bytes each): about 3 KB per kept document with the defaults. The texts themselves are never held.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

MERSENNE_PRIME = (1 << 31) - 1
_WORD = re.compile(r"\w+")
_ROLL = np.uint64(0x100000001B3)  # odd multiplier that chains token hashes into a shingle hash
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64 finaliser


def lsh_threshold(bands: int, rows: int) -> float:
    """Jaccard similarity near which the LSH S-curve 1 - (1 - J^r)^b rises steepest: (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that two sets with this Jaccard similarity share at least one LSH band."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def exact_jaccard(a: set, b: set) -> float:
    """|A n B| / |A u B| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


class ExactDeduplicator:
    """`is_duplicate(text)` is True when the same text was seen before; remembers it otherwise."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False


class MinHasher:
    """MinHash signatures of texts under k universal hash functions h_i(x) = (a_i x + b_i) mod (2^31 - 1)."""

    def __init__(self, num_perm: int = 128, shingle: str = "word", ngram: int = 5, seed: int = 0) -> None:
        if shingle not in ("word", "char"):
            raise ValueError(f"shingle={shingle!r} is unknown; choose 'word' or 'char'")
        if num_perm < 1 or ngram < 1:
            raise ValueError(f"num_perm={num_perm} and ngram={ngram} must both be >= 1")
        self.num_perm, self.shingle, self.ngram = num_perm, shingle, ngram
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)

    def tokens(self, text: str) -> np.ndarray:
        """Token ids as uint64: CRC-32 of each lower-cased word, or the code points of the text with
        whitespace collapsed to one space."""
        if self.shingle == "word":
            words = _WORD.findall(text.lower())
            return np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), np.uint64, len(words))
        chars = " ".join(text.lower().split()).encode("utf-32-le", "surrogatepass")
        return np.frombuffer(chars, dtype=np.uint32).astype(np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """The set of shingle hashes (sorted, unique, each < 2^31 - 1). A text shorter than n tokens is
        one shingle; a text with no tokens has none."""
        tokens = self.tokens(text)
        if len(tokens) == 0:
            return tokens
        n = min(self.ngram, len(tokens))
        count = len(tokens) - n + 1
        h = np.zeros(count, dtype=np.uint64)
        for j in range(n):  # polynomial hash of the n tokens, modulo 2^64
            h = h * _ROLL + tokens[j : j + count]
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
        return np.unique(h % np.uint64(MERSENNE_PRIME))

    def signature(self, text: str) -> np.ndarray | None:
        """(num_perm,) uint32 MinHash signature, or None for a text with no tokens."""
        x = self.shingles(text)
        if len(x) == 0:
            return None
        sig = np.full(self.num_perm, MERSENNE_PRIME, dtype=np.uint64)
        chunk = max(1, (1 << 20) // self.num_perm)  # bound the (k, chunk) intermediate to ~8 MB
        for start in range(0, len(x), chunk):
            values = (self.a * x[None, start : start + chunk] + self.b) % np.uint64(MERSENNE_PRIME)  # (k, chunk)
            np.minimum(sig, values.min(axis=1), out=sig)
        return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash entries: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


class NearDeduplicator:
    """`is_duplicate(text)` is True when an earlier kept text is a near-duplicate (MinHash + LSH)."""

    def __init__(
        self,
        num_perm: int = 128,
        bands: int = 32,
        threshold: float = 0.8,
        shingle: str = "word",
        ngram: int = 5,
        seed: int = 0,
    ) -> None:
        if bands < 1 or num_perm % bands:
            raise ValueError(f"bands={bands} must divide num_perm={num_perm} (rows per band = num_perm / bands)")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be a Jaccard similarity in [0, 1]")
        self.hasher = MinHasher(num_perm, shingle, ngram, seed)
        self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
        self.buckets: list[dict[int, int]] = [{} for _ in range(bands)]
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)  # kept documents' signatures, grown x2
        self.n_kept = 0

    def band_keys(self, sig: np.ndarray) -> list[int]:
        """One 64-bit key per band: the band's r values chained by a polynomial hash (a Python int costs
        less memory than the band's bytes; a false match needs a 64-bit collision and is re-checked)."""
        rows = sig.reshape(self.bands, self.rows).astype(np.uint64)
        keys = np.zeros(self.bands, dtype=np.uint64)
        for j in range(self.rows):
            keys = keys * _ROLL + rows[:, j]
        return keys.tolist()

    def is_duplicate(self, text: str) -> bool:
        sig = self.hasher.signature(text)
        if sig is None:
            return False
        keys = self.band_keys(sig)
        candidates = {c for bucket, key in zip(self.buckets, keys, strict=False) if (c := bucket.get(key)) is not None}
        for c in candidates:
            if self.threshold == 0.0 or estimated_jaccard(sig, self.signatures[c]) >= self.threshold:
                return True
        if self.n_kept == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[self.n_kept] = sig
        for bucket, key in zip(self.buckets, keys, strict=False):
            bucket.setdefault(key, self.n_kept)
        self.n_kept += 1
        return False
