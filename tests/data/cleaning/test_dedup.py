"""Exact and MinHash/LSH near-duplicate detection, with exact Jaccard similarity as the oracle."""

import random

import numpy as np
import pytest

from lmforge.data.cleaning.clean import CleanConfig, clean_texts
from lmforge.data.cleaning.dedup import (
    ExactDeduplicator,
    MinHasher,
    NearDeduplicator,
    candidate_probability,
    estimated_jaccard,
    exact_jaccard,
    lsh_threshold,
)

VOCAB = [f"word{i}" for i in range(5000)]


def random_words(n: int, seed: int) -> list[str]:
    return random.Random(seed).choices(VOCAB, k=n)


def word_shingles(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_exact_dedup_keeps_the_first_copy():
    dedup = ExactDeduplicator()
    assert [dedup.is_duplicate(t) for t in ["a b", "c", "a b", "a  b", "c"]] == [False, False, True, False, True]
    texts = ["The cat sat.", "A dog ran.", "The cat sat.", "The cat sat!"]
    assert list(clean_texts(texts, CleanConfig(steps=("exact_dedup",)))) == [texts[0], texts[1], texts[3]]


@pytest.mark.parametrize("shared", [0, 50, 150, 300, 400])
def test_minhash_estimates_the_exact_jaccard_similarity(shared):
    # Two 400-word documents that share a run of `shared` words: the exact Jaccard similarity of their
    # 5-gram shingle sets is known from the sets; MinHash with k = 256 must land within 0.1 of it.
    a = random_words(400, seed=1)
    b = a[:shared] + random_words(400 - shared, seed=2)
    hasher = MinHasher(num_perm=256, ngram=5, seed=3)
    exact = exact_jaccard(word_shingles(a), word_shingles(b))
    estimate = estimated_jaccard(hasher.signature(" ".join(a)), hasher.signature(" ".join(b)))
    assert abs(estimate - exact) < 0.1, (exact, estimate)


def test_minhash_shingle_hashes_match_the_shingle_set():
    # The hashed shingle set has exactly as many members as the set of word 5-grams (no collisions here),
    # and words are compared case- and punctuation-insensitively.
    words = random_words(300, seed=4)
    hasher = MinHasher(ngram=5)
    assert len(hasher.shingles(" ".join(words))) == len(word_shingles(words))
    assert np.array_equal(hasher.signature("The cat, sat on the mat."), hasher.signature("the cat sat on THE mat"))
    assert hasher.signature("...") is None


def test_char_shingles_estimate_jaccard_too():
    a = "".join(random.Random(5).choices("abcdefghij ", k=3000))
    b = a[:1500] + "".join(random.Random(6).choices("abcdefghij ", k=1500))
    shingles = [{s[i : i + 5] for i in range(len(s) - 4)} for s in (" ".join(a.split()), " ".join(b.split()))]
    hasher = MinHasher(num_perm=256, shingle="char", ngram=5)
    estimate = estimated_jaccard(hasher.signature(a), hasher.signature(b))
    assert abs(estimate - exact_jaccard(*shingles)) < 0.1


def test_near_duplicates_with_a_few_changed_words_are_removed():
    docs = [random_words(300, seed=s) for s in range(20)]
    edited = []
    for i, words in enumerate(docs[:10]):  # change 3 words in each of the first ten
        copy = list(words)
        for pos in random.Random(100 + i).sample(range(300), 3):
            copy[pos] = "changed"
        edited.append(copy)
    texts = [" ".join(w) for w in docs + edited]
    dedup = NearDeduplicator()
    flags = [dedup.is_duplicate(t) for t in texts]
    assert flags == [False] * 20 + [True] * 10
    assert min(exact_jaccard(word_shingles(a), word_shingles(b)) for a, b in zip(docs[:10], edited, strict=True)) > 0.85


def test_documents_below_the_threshold_are_kept_even_when_lsh_pairs_them():
    # Half-overlapping documents (J ~ 0.33) share LSH bands often with b=32, r=4 (P ~ 0.3) but fail
    # the signature check; with the check switched off (threshold 0) some are wrongly dropped.
    base = [random_words(400, seed=s) for s in range(30)]
    halves = [w[:200] + random_words(200, seed=1000 + i) for i, w in enumerate(base)]
    texts = [" ".join(w) for w in base + halves]
    checked = NearDeduplicator(threshold=0.8)
    assert not any(checked.is_duplicate(t) for t in texts)
    unchecked = NearDeduplicator(threshold=0.0)
    assert sum(unchecked.is_duplicate(t) for t in texts) > 0


def test_lsh_s_curve():
    assert lsh_threshold(32, 4) == pytest.approx((1 / 32) ** 0.25)
    assert lsh_threshold(20, 5) == pytest.approx(0.549, abs=1e-3)
    assert candidate_probability(0.8, 32, 4) > 0.999999
    assert candidate_probability(0.1, 32, 4) < 0.01
    # The S-curve's half-way point sits near (1/b)^(1/r).
    assert candidate_probability(lsh_threshold(16, 8), 16, 8) == pytest.approx(1 - (1 - 1 / 16) ** 16)


def test_signatures_are_deterministic_for_a_seed():
    text = " ".join(random_words(100, seed=7))
    assert np.array_equal(MinHasher(seed=1).signature(text), MinHasher(seed=1).signature(text))
    assert not np.array_equal(MinHasher(seed=1).signature(text), MinHasher(seed=2).signature(text))


def test_bad_lsh_settings_are_refused():
    with pytest.raises(ValueError, match="bands=5 must divide num_perm=128"):
        NearDeduplicator(num_perm=128, bands=5)
    with pytest.raises(ValueError, match="shingle='token'"):
        MinHasher(shingle="token")
