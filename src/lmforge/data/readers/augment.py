"""Text augmentation for classification: EDA and round-trip (back-)translation.

**EDA** (Wei & Zou, 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text
Classification") makes label-preserving variants of a sentence of l words with four operations:

- random replacement (the paper's synonym replacement): replace n = max(1, int(alpha_sr * l)) words;
- random insertion: insert n = max(1, int(alpha_ri * l)) words at random positions;
- random swap: swap two random words, n = max(1, int(alpha_rs * l)) times;
- random deletion: drop each word with probability p = alpha_rd (never all of them).

The paper draws replacement and inserted words from WordNet synonyms. No thesaurus ships offline here,
so both draw from the training corpus itself (`AugmentVocab`): any word seen in the training texts,
or, with `same_class=True`, only words seen in texts of the same label, which keeps inserted words
on-topic for the class. Words are whitespace tokens; tokens without a letter or digit (punctuation) are
not candidates. The paper's defaults: alpha = 0.1 for all four and n_aug = 16 augmented sentences per
original for small sets (< 500 examples), 4 for large ones.

**Back-translation** (Sennrich et al., 2016; Xie et al., 2020 for classification) paraphrases a text by
translating it to a pivot language and back. `back_translate` takes the translator as a plain callable
`translate(texts, src, tgt) -> texts`, so any model can be plugged in; it does the batching, the round
trip, and drops paraphrases equal to the original or to each other.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from lmforge.data.readers.records import ClassificationExample

Translate = Callable[[list[str], str, str], list[str]]


# ----------------------------------------------------------------------------------------------------
# The four EDA operations on a list of words


def _n_changes(alpha: float, n_words: int) -> int:
    return max(1, int(alpha * n_words))


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """`n` swaps of two distinct random positions; the multiset of words is unchanged."""
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Each word dropped with probability `p`; if every word would go, one random word stays."""
    if len(words) <= 1:
        return list(words)
    kept = [word for word in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def random_insertion(words: Sequence[str], n: int, candidates: Sequence[str], rng: random.Random) -> list[str]:
    """`n` words drawn from `candidates` inserted at random positions (the ends included)."""
    words = list(words)
    if not candidates:
        return words
    for _ in range(n):
        words.insert(rng.randint(0, len(words)), rng.choice(candidates))
    return words


def random_replacement(words: Sequence[str], n: int, candidates: Sequence[str], rng: random.Random) -> list[str]:
    """`n` distinct word positions (letters or digits only) replaced by a different word from `candidates`."""
    words = list(words)
    positions = [i for i, word in enumerate(words) if _is_word(word)]
    if not candidates:
        return words
    for i in rng.sample(positions, min(n, len(positions))):
        for _ in range(10):  # rejection sampling: a draw equal to the word itself would change nothing
            choice = rng.choice(candidates)
            if choice != words[i]:
                words[i] = choice
                break
    return words


def _is_word(token: str) -> bool:
    return any(c.isalnum() for c in token)


# ----------------------------------------------------------------------------------------------------
# Corpus vocabulary and EDA over a data set


@dataclass(frozen=True)
class AugmentVocab:
    """Candidate words for replacement and insertion: every word of the training texts seen at least
    `min_count` times, and the same per label. Sorted, so sampling with a seed is reproducible."""

    words: tuple[str, ...]
    by_label: dict[str, tuple[str, ...]]

    @classmethod
    def build(cls, examples: Iterable[ClassificationExample], min_count: int = 1) -> AugmentVocab:
        total: Counter = Counter()
        per_label: dict[str, Counter] = {}
        for example in examples:
            words = [word for word in example.text.split() if _is_word(word)]
            total.update(words)
            for label in example.labels:
                per_label.setdefault(label, Counter()).update(words)

        def keep(counts: Counter) -> tuple[str, ...]:
            return tuple(sorted(word for word, count in counts.items() if count >= min_count))

        return cls(keep(total), {label: keep(counts) for label, counts in sorted(per_label.items())})

    def candidates(self, labels: Sequence[str] = (), same_class: bool = False) -> tuple[str, ...]:
        """All words, or with `same_class` the words seen with any of `labels`."""
        if not same_class or not labels:
            return self.words
        return tuple(sorted(set().union(*(self.by_label.get(label, ()) for label in labels))))


@dataclass(frozen=True)
class EDAConfig:
    """EDA strengths (the paper's alpha per operation) and the number of variants per example."""

    alpha_sr: float = 0.1
    alpha_ri: float = 0.1
    alpha_rs: float = 0.1
    alpha_rd: float = 0.1
    n_aug: int = 4
    same_class: bool = False

    def __post_init__(self):
        for name in ("alpha_sr", "alpha_ri", "alpha_rs", "alpha_rd"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be between 0 and 1")
        if self.n_aug < 0:
            raise ValueError(f"n_aug={self.n_aug} must be >= 0")


def eda(text: str, candidates: Sequence[str], config: EDAConfig, rng: random.Random) -> list[str]:
    """Up to `config.n_aug` distinct variants of `text`, none equal to it. As in the paper, the
    variants are split evenly among the operations whose alpha is non-zero (each variant applies one),
    then shuffled and cut to n_aug; repeats are dropped and replaced by up to three more rounds, so
    only very short or repetitive texts yield fewer variants."""
    words = text.split()
    if not words or config.n_aug == 0:
        return []
    l = len(words)
    operations = [
        (config.alpha_sr, lambda: random_replacement(words, _n_changes(config.alpha_sr, l), candidates, rng)),
        (config.alpha_ri, lambda: random_insertion(words, _n_changes(config.alpha_ri, l), candidates, rng)),
        (config.alpha_rs, lambda: random_swap(words, _n_changes(config.alpha_rs, l), rng)),
        (config.alpha_rd, lambda: random_deletion(words, config.alpha_rd, rng)),
    ]
    operations = [op for alpha, op in operations if alpha > 0]
    if not operations:
        return []
    per_operation = -(-config.n_aug // len(operations))
    distinct: dict[str, None] = {}
    for _ in range(4):  # a few more rounds when variants repeat (short or repetitive texts)
        variants = [" ".join(op()) for op in operations for _ in range(per_operation)]
        rng.shuffle(variants)
        distinct.update((v, None) for v in variants if v != " ".join(words))
        if len(distinct) >= config.n_aug:
            break
    return list(distinct)[: config.n_aug]


def augment_classification(
    examples: Sequence[ClassificationExample],
    config: EDAConfig = EDAConfig(),
    *,
    seed: int = 0,
    vocab: AugmentVocab | None = None,
) -> list[ClassificationExample]:
    """EDA variants of every example, with the example's labels (the originals are not included).
    The candidate words come from `vocab`, by default built from `examples`; pass the training set's
    vocabulary when augmenting a subset. Same examples, config and seed give the same output."""
    if any(example.text_pair is not None for example in examples):
        raise ValueError("EDA augments single texts; these examples have text pairs, whose relation it could break")
    vocab = vocab or AugmentVocab.build(examples)
    rng = random.Random(seed)
    augmented = []
    for example in examples:
        candidates = vocab.candidates(example.labels, config.same_class)
        augmented.extend(replace(example, text=variant) for variant in eda(example.text, candidates, config, rng))
    return augmented


# ----------------------------------------------------------------------------------------------------
# Back-translation


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _translate_checked(translate: Translate, texts: list[str], src: str, tgt: str) -> list[str]:
    out = translate(texts, src, tgt)
    if not isinstance(out, list) or len(out) != len(texts) or not all(isinstance(t, str) for t in out):
        got = f"{len(out)} items" if isinstance(out, list) else type(out).__name__
        raise ValueError(f"translate(texts, {src!r}, {tgt!r}) must return a list of {len(texts)} strings, got {got}")
    return out


def back_translate(
    texts: Sequence[str],
    translate: Translate,
    *,
    source: str = "en",
    pivots: Sequence[str] = ("fr",),
    batch_size: int = 32,
) -> list[list[str]]:
    """For each text, its round-trip paraphrases `translate(translate([t], source, pivot), pivot, source)`,
    one per pivot language, keeping only those that differ from the text and from each other (compared
    ignoring case and runs of whitespace). `translate` is called on batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    texts = list(texts)
    paraphrases: list[list[str]] = [[] for _ in texts]
    seen = [{_normalise(text)} for text in texts]
    for pivot in pivots:
        if pivot == source:
            raise ValueError(f"pivot language {pivot!r} is the source language; choose another pivot")
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            there = _translate_checked(translate, batch, source, pivot)
            back = _translate_checked(translate, there, pivot, source)
            for i, paraphrase in enumerate(back, start):
                key = _normalise(paraphrase)
                if key and key not in seen[i]:
                    seen[i].add(key)
                    paraphrases[i].append(paraphrase)
    return paraphrases


def back_translate_examples(
    examples: Sequence[ClassificationExample], translate: Translate, **options
) -> list[ClassificationExample]:
    """Back-translated paraphrases of each example's text, with the example's labels; options as in
    `back_translate`. Originals are not included."""
    if any(example.text_pair is not None for example in examples):
        raise ValueError("back_translate_examples augments single texts; paraphrase text pairs with back_translate")
    texts = back_translate([example.text for example in examples], translate, **options)
    return [replace(ex, text=t) for ex, variants in zip(examples, texts, strict=True) for t in variants]
