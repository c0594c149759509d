"""Entity-level tagging metrics against seqeval's default (conlleval-compatible) mode on random, often
malformed, BIO and IOBES sequences."""

import random

import pytest
from seqeval.metrics import accuracy_score
from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

from lmforge.eval import entity_precision_recall_f1, entity_spans, tagging_report, token_accuracy

SEEDS = range(6)
TOL = 1e-9
TYPES = ("PER", "LOC", "ORG")


def _random_tags(rng: random.Random, prefixes: str, length: int) -> list[str]:
    """Mostly O, with random prefixes: I- after O (IOB1), type changes inside entities, stray E-/S-."""
    return ["O" if rng.random() < 0.4 else f"{rng.choice(prefixes)}-{rng.choice(TYPES)}" for _ in range(length)]


def _corpus(seed: int, prefixes: str) -> tuple[list[list[str]], list[list[str]]]:
    rng = random.Random(seed)
    y_true = [_random_tags(rng, prefixes, rng.randint(0, 12)) for _ in range(80)]
    y_pred = [[t if rng.random() < 0.7 else _random_tags(rng, prefixes, 1)[0] for t in sent] for sent in y_true]
    return y_true, y_pred


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prefixes", ["BI", "BIES"])
def test_entity_spans_match_seqeval(seed, prefixes):
    rng = random.Random(seed)
    for _ in range(200):
        tags = _random_tags(rng, prefixes, rng.randint(0, 10))
        expected = [(kind, start, end + 1) for kind, start, end in get_entities(tags)]
        assert entity_spans(tags) == expected, tags


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prefixes", ["BI", "BIES"])
def test_scores_match_seqeval(seed, prefixes):
    y_true, y_pred = _corpus(seed, prefixes)
    for average in ("micro", "macro", "weighted"):
        ours = entity_precision_recall_f1(y_true, y_pred, average=average)
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx([p, r, f], abs=TOL)
    per_type = entity_precision_recall_f1(y_true, y_pred, average=None)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    assert list(per_type) == sorted(TYPES)
    assert [v["precision"] for v in per_type.values()] == pytest.approx(list(p), abs=TOL)
    assert [v["recall"] for v in per_type.values()] == pytest.approx(list(r), abs=TOL)
    assert [v["f1"] for v in per_type.values()] == pytest.approx(list(f), abs=TOL)
    assert [v["support"] for v in per_type.values()] == list(support)
    assert token_accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred), abs=TOL)


def test_iob1_and_type_changes_are_read_like_conlleval():
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "E-ORG", "S-PER"]
    assert entity_spans(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 7), ("PER", 7, 8)]


def test_entities_do_not_cross_sentences():
    """The gold entity of sentence 1 must not merge with an I- continuing into sentence 2."""
    y_true = [["B-PER"], ["I-PER"]]
    assert tagging_report(y_true, y_true)["n_entities"] == 2
    assert entity_precision_recall_f1(y_true, [["B-PER"], ["B-PER"]])["f1"] == 1.0


def test_report_layout_and_counts():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    y_pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
    report = tagging_report(y_true, y_pred)
    assert report["n_sentences"] == 2 and report["n_entities"] == 3
    assert report["precision_micro"] == pytest.approx(1 / 2) and report["recall_micro"] == pytest.approx(1 / 3)
    assert report["per_class"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report["token_accuracy"] == pytest.approx(4 / 6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="sentence 0 has 2 gold tags but 1 predicted"):
        token_accuracy([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="'X-PER' is not O or B-/I-/E-/S-TYPE"):
        entity_spans(["X-PER"])
    with pytest.raises(ValueError, match="lists of tag sequences"):
        entity_precision_recall_f1(["O", "B-PER"], ["O", "B-PER"])
