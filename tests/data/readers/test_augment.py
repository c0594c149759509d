"""EDA operations and the back-translation hook: invariants, corpus-only words, seeded determinism."""

import codecs
import random
from collections import Counter

import pytest

from lmforge.data.readers.augment import (
    AugmentVocab,
    EDAConfig,
    augment_classification,
    back_translate,
    back_translate_examples,
    eda,
    random_deletion,
    random_insertion,
    random_replacement,
    random_swap,
)
from lmforge.data.readers.records import ClassificationExample

# Real-format movie-review sentences (lower-cased, tokenized, as in the Pang & Lee sentence polarity data).
TRAIN = [
    ClassificationExample("a gorgeous , witty , seductive movie .", ("1",)),
    ClassificationExample("the performances are an absolute joy .", ("1",)),
    ClassificationExample("one of the best films of the year , with a wonderful cast .", ("1",)),
    ClassificationExample("a dull , simplistic and silly mess .", ("-1",)),
    ClassificationExample("the plot is tired and the jokes fall flat .", ("-1",)),
    ClassificationExample("too long , too loud and far too boring .", ("-1",)),
]


def random_sentences(rng, n=300):
    words = ["the", "a", "movie", "plot", "is", "dull", "witty", ",", ".", "and", "of", "film", "cast", "joy"]
    return [[rng.choice(words) for _ in range(rng.randint(1, 25))] for _ in range(n)]


def test_deletion_never_empties_and_keeps_order():
    rng = random.Random(0)
    for words in random_sentences(rng):
        for p in (0.1, 0.5, 1.0):
            out = random_deletion(words, p, rng)
            assert 1 <= len(out) <= len(words)
            it = iter(words)
            assert all(word in it for word in out)  # a subsequence of the original


def test_swap_preserves_the_multiset_of_words():
    rng = random.Random(1)
    for words in random_sentences(rng):
        out = random_swap(words, 3, rng)
        assert Counter(out) == Counter(words)
        assert sum(a != b for a, b in zip(out, words, strict=True)) <= 6


def test_insertion_and_replacement_use_only_corpus_words():
    vocab = AugmentVocab.build(TRAIN)
    corpus_words = {w for ex in TRAIN for w in ex.text.split() if w not in {",", "."}}
    assert set(vocab.words) == corpus_words
    assert "mess" in vocab.by_label["-1"] and "mess" not in vocab.by_label["1"]
    rng = random.Random(2)
    for words in random_sentences(rng):
        inserted = Counter(random_insertion(words, 2, vocab.words, rng)) - Counter(words)
        assert sum(inserted.values()) == 2 and set(inserted) <= corpus_words
        replaced = random_replacement(words, 2, vocab.words, rng)
        assert len(replaced) == len(words)
        assert {b for a, b in zip(words, replaced, strict=True) if a != b} <= corpus_words


def test_same_class_restricts_new_words_to_the_class_vocabulary():
    vocab = AugmentVocab.build(TRAIN)
    config = EDAConfig(alpha_sr=0.3, alpha_ri=0.3, alpha_rs=0, alpha_rd=0, n_aug=8, same_class=True)
    for original in TRAIN:
        variants = augment_classification([original], config, seed=0, vocab=vocab)
        assert len(variants) == 8
        new_words = {w for ex in variants for w in ex.text.split()} - set(original.text.split())
        assert new_words and new_words <= set(vocab.by_label[original.label])
        assert all(ex.labels == original.labels and ex.text != original.text for ex in variants)


def test_eda_counts_follow_alpha_and_variants_are_distinct():
    rng = random.Random(3)
    words = [
        "one",
        "of",
        "the",
        "best",
        "films",
        "of",
        "the",
        "year",
        ",",
        "with",
        "a",
        "wonderful",
        "cast",
        ".",
    ]  # l = 14
    only_insert = EDAConfig(alpha_sr=0, alpha_ri=0.25, alpha_rs=0, alpha_rd=0, n_aug=6)
    for variant in eda(" ".join(words), ["joy", "witty"], only_insert, rng):
        assert len(variant.split()) == len(words) + 3  # n = max(1, int(0.25 * 14)) = 3
    variants = eda(" ".join(words), AugmentVocab.build(TRAIN).words, EDAConfig(n_aug=16), rng)
    assert len(variants) == len(set(variants)) == 16 and " ".join(words) not in variants
    assert eda("word", ["word"], EDAConfig(alpha_sr=0, alpha_ri=0, alpha_rd=0), rng) == []  # nothing can change
    with pytest.raises(ValueError, match="alpha_rd=1.5 must be between 0 and 1"):
        EDAConfig(alpha_rd=1.5)


def test_augmentation_is_seeded_and_keeps_labels():
    first = augment_classification(TRAIN, EDAConfig(n_aug=4), seed=7)
    assert first == augment_classification(TRAIN, EDAConfig(n_aug=4), seed=7)
    assert first != augment_classification(TRAIN, EDAConfig(n_aug=4), seed=8)
    assert [ex.labels for ex in first] == [ex.labels for ex in TRAIN for _ in range(4)]
    with pytest.raises(ValueError, match="text pairs"):
        augment_classification([ClassificationExample("a b", ("x",), "c d")])


# ---------------------------------------------------------------------------------------------------- back-translation


class CharacterMappingTranslator:
    """A real, deterministic translator between English and made-up "languages" obtained by character
    mappings, so the round trip is checkable: en<->fr is rot13 both ways (exact inverse); de swaps case
    on the way out (the round trip differs only in case); es maps back with British spellings made
    American (a genuine paraphrase for texts that have them)."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, src, tgt):
        self.calls.append((src, tgt, len(texts)))
        if src == "en":
            out = [codecs.encode(t, "rot13") for t in texts]
            return [t.swapcase() for t in out] if tgt == "de" else out
        english = [codecs.encode(t, "rot13") for t in texts]
        return [t.replace("colour", "color") for t in english] if src == "es" else english


def test_back_translation_round_trip_batching_and_deduplication():
    texts = ["the colour is dull .", "a witty film .", "Colour  and  colour", "joy", "the colour"]
    translate = CharacterMappingTranslator()
    paraphrases = back_translate(texts, translate, pivots=("fr", "de", "es"), batch_size=2)
    assert paraphrases == [["the color is dull ."], [], ["Colour  and  color"], [], ["the color"]]
    per_pivot = [("en", "fr", 2), ("fr", "en", 2)] * 2 + [("en", "fr", 1), ("fr", "en", 1)]
    assert translate.calls[:6] == per_pivot
    assert [(src, tgt) for src, tgt, _ in translate.calls[6:12]] == [("en", "de"), ("de", "en")] * 3
    examples = back_translate_examples(
        TRAIN[:1] + [ClassificationExample("the colour", ("1",))], translate, pivots=["es"]
    )
    assert examples == [ClassificationExample("the color", ("1",))]


def test_back_translation_rejects_a_translator_that_drops_texts():
    with pytest.raises(ValueError, match=r"must return a list of 2 strings, got 1 items"):
        back_translate(["a", "b"], lambda texts, src, tgt: texts[:1])
    with pytest.raises(ValueError, match="pivot language 'en' is the source language"):
        back_translate(["a"], lambda texts, src, tgt: texts, pivots=["en"])
