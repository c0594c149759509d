"""CoNLL and word/TAG readers, and BIO helpers checked against seqeval (the CoNLL evaluation convention)."""

import random

import pytest
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOB2, Entities

from lmforge.data.readers.conll import (
    TaggedSentence,
    bio_problems,
    bio_spans,
    read_conll,
    read_tagged_text,
    repair_bio,
    spans_to_bio,
    write_conll,
)
from lmforge.data.readers.records import DataFormatError

# CoNLL-2003 layout: token, POS, chunk, NER (IOB1 in the original: entities may start with I-).
CONLL_2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP I-LOC
1996-08-22 CD I-NP O
"""


def test_conll_2003_with_docstart_and_several_sentences(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(CONLL_2003)
    sentences = list(read_conll(path))
    assert [s.tokens for s in sentences] == [
        ("EU", "rejects", "German", "call", "."),
        ("Peter", "Blackburn"),
        ("BRUSSELS", "1996-08-22"),
    ]
    assert sentences[1].tags == ("I-PER", "I-PER")
    pos = list(read_conll(path, tag_column=1))
    assert pos[0].tags == ("NNP", "VBZ", "JJ", "NN", ".")
    repaired = list(read_conll(path, bio="repair"))
    assert repaired[0].tags == ("B-ORG", "O", "B-MISC", "O", "O")
    assert repaired[1].tags == ("B-PER", "I-PER")


def test_conll_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("EU B-ORG\nrejects O\n\nPeter NNP B-PER\n")
    with pytest.raises(
        DataFormatError, match=r"bad\.conll:4: expected 2 columns \(as on the first token line\), found 3"
    ):
        list(read_conll(path))
    path.write_text("EU B-ORG\nrejects O\n\nPeter O\nBlackburn I-PER\n")
    with pytest.raises(DataFormatError, match=r"bad\.conll:5: tag 'I-PER' does not continue an entity"):
        list(read_conll(path, bio="strict"))
    path.write_text("EU B-ORG\nrejects X-Y\n")
    with pytest.raises(DataFormatError, match=r"bad\.conll:2: tag 'X-Y' is not BIO"):
        list(read_conll(path, bio="repair"))
    path.write_text("EU B-ORG\n")
    with pytest.raises(DataFormatError, match=r"bad\.conll:1: tag_column=3 but the line has 2 columns"):
        list(read_conll(path, tag_column=3))
    for content in ("\n\n", "-DOCSTART- -X- O\n\n"):
        path.write_text(content)
        with pytest.raises(DataFormatError, match=r"bad\.conll: no token lines"):
            list(read_conll(path))


def test_tab_separated_columns_and_write_round_trip(tmp_path):
    path = tmp_path / "tabs.tsv"
    path.write_text("New York\tB-LOC\nis\tO\n\nhi\tO\n")
    sentences = list(read_conll(path, separator="\t"))
    assert sentences[0] == TaggedSentence(("New York", "is"), ("B-LOC", "O"))
    with pytest.raises(ValueError, match="holds whitespace"):
        write_conll(sentences, tmp_path / "out.conll")
    assert not (tmp_path / "out.conll").exists()
    clean = [TaggedSentence(("EU", "rejects"), ("B-ORG", "O")), TaggedSentence(("Hi",), ("O",))]
    assert write_conll(clean, tmp_path / "out.conll", docstart=True) == 2
    assert list(read_conll(tmp_path / "out.conll")) == clean


def test_word_slash_tag_text_splits_on_the_last_slash(tmp_path):
    path = tmp_path / "wsj.txt"
    path.write_text("Pierre/NNP Vinken/NNP ,/, 61/CD\n\n1\\/2/CD and/CC/OR/CC\n")
    sentences = list(read_tagged_text(path))
    assert sentences[0] == TaggedSentence(("Pierre", "Vinken", ",", "61"), ("NNP", "NNP", ",", "CD"))
    assert sentences[1] == TaggedSentence(("1\\/2", "and/CC/OR"), ("CD", "CC"))
    path.write_text("Pierre/NNP\nVinken/NNP is chairman/NN\n")
    with pytest.raises(DataFormatError, match=r"wsj\.txt:2: token 1 'is' is not word/TAG"):
        list(read_tagged_text(path))


def test_bio_spans_agree_with_seqeval_on_random_tags_valid_or_not():
    rng = random.Random(0)
    tags_pool = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(2000):
        tags = [rng.choice(tags_pool) for _ in range(rng.randint(0, 12))]
        ours = [(kind, start, end - 1) for kind, start, end in bio_spans(tags)]
        assert ours == get_entities(tags), tags
        repaired = repair_bio(tags)
        assert bio_problems(repaired) == []
        strict = sorted((e.start, e.end, e.tag) for e in Entities([repaired], IOB2).entities[0])
        assert strict == [(start, end, kind) for kind, start, end in bio_spans(tags)], tags


def test_bio_problems_and_spans_to_bio():
    assert bio_problems(["I-PER", "I-PER", "O", "B-LOC", "I-ORG"]) == [0, 4]
    assert spans_to_bio([("PER", 0, 2), ("LOC", 3, 4)], 5) == ["B-PER", "I-PER", "O", "B-LOC", "O"]
    with pytest.raises(ValueError, match="overlaps"):
        spans_to_bio([("PER", 0, 2), ("LOC", 1, 3)], 4)
    with pytest.raises(ValueError, match="is not BIO"):
        bio_spans(["B"])
