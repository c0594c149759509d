"""Extractive QA windows checked against transformers' overflowing-tokens recipe; span decoding by peaks."""

import numpy as np
import pytest
import torch
import transformers

from lmforge.data.corpora.catalog import load_dataset
from lmforge.data.corpora.derived import cloze_qa_from_tagged
from lmforge.data.readers.conll import TaggedSentence
from lmforge.data.readers.squad import Answer, QAExample
from lmforge.data.tokenizers.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer
from lmforge.finetune.qa import decode_qa, encode_qa
from lmforge.hf.real_weights import minilm_folder

LONG_CONTEXT = (
    "The Eiffel Tower was completed in 1889 as the entrance arch of the World's Fair in Paris. "
    "Critics of the day called it an eyesore, yet within a few years it had become a symbol of the city. "
    "It stood as the tallest man-made structure in the world for 41 years, until the Chrysler Building "
    "in New York was finished in 1930. The tower was designed by the engineers Maurice Koechlin and "
    "Émile Nouguier, and built by the company of Gustave Eiffel, whose name it carries. "
    "Today about seven million people visit it every year, which makes it the most visited paid monument."
)


def example(qid: str, question: str, answer: str | None, context: str = LONG_CONTEXT) -> QAExample:
    if answer is None:
        return QAExample(qid, question, context, (), True)
    return QAExample(qid, question, context, (Answer(answer, context.index(answer)),))


HAND_MADE = [
    example("early", "When was it completed?", "1889"),
    example("middle", "Which building overtook it?", "the Chrysler Building"),
    example("late", "Who built it?", "the company of Gustave Eiffel"),
    example("end", "What kind of monument is it?", "the most visited paid monument"),
    example("none", "Who painted the Mona Lisa?", None),
]


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def tokenizer(request):
    """A BERT WordPiece ([CLS] q [SEP] c [SEP], token types) and GPT-2's byte-level BPE (q <eos> c), the
    latter converted from tiktoken once here rather than in every encode_qa call."""
    if request.param == "bert":
        return load_tokenizer(minilm_folder())
    gpt2 = gpt2_tokenizer()
    return Tokenizer(gpt2.to_tokenizers(), gpt2.special_tokens)


@pytest.fixture(scope="module")
def examples():
    """Hand-made questions over a long context (several windows) and cloze questions over real WSJ text."""
    records = load_dataset("wsj-pos").splits["train"][:60]
    sentences = [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for r in records]
    return HAND_MADE + cloze_qa_from_tagged(sentences, seed=0, unanswerable_fraction=0.3)


def span_text(example, feature):
    start, end = feature["start_positions"], feature["end_positions"]
    return example.context[feature["offsets"][start][0] : feature["offsets"][end][1]]


def gold_span_text(ex, index, features):
    """The text of the labelled token span (the answer itself, or the tokens that cover it)."""
    return next(span_text(ex, f) for f in features if f["example_index"] == index and f["start_positions"])


def test_windows_equal_transformers_overflowing_windows():
    bert = load_tokenizer(minilm_folder())
    features, _ = encode_qa(bert, HAND_MADE, max_length=48, doc_stride=16)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=bert.to_tokenizers())
    expected = theirs(
        [e.question for e in HAND_MADE],
        [e.context for e in HAND_MADE],
        truncation="only_second",
        max_length=48,
        stride=16,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
    )
    assert [f["input_ids"] for f in features] == expected.input_ids
    assert [f["token_type_ids"] for f in features] == expected.token_type_ids
    assert [f["example_index"] for f in features] == expected.overflow_to_sample_mapping
    for i, feature in enumerate(features):
        in_context = [s == 1 for s in expected.sequence_ids(i)]
        assert [o is not None for o in feature["offsets"]] == in_context
        assert [o for o in feature["offsets"] if o] == [
            o for o, c in zip(expected.offset_mapping[i], in_context, strict=True) if c
        ]


def test_every_answer_decodes_back_from_its_positions_and_windows_cover_the_context(tokenizer, examples):
    features, stats = encode_qa(tokenizer, examples, max_length=64, doc_stride=24)
    assert stats["total"] == len(examples) and stats["features"] == len(features) > len(examples)
    assert stats["unmapped_answers"] == stats["questions_truncated"] == 0
    inexact = 0  # GPT-2 spells "Mass.," as "ĠMass" ".,": the answer "Mass." then ends inside a token
    for index, ex in enumerate(examples):
        windows = [f for f in features if f["example_index"] == index]
        positive = [f for f in windows if f["start_positions"] > 0]
        if ex.is_impossible:
            assert not positive and all(f["end_positions"] == 0 for f in windows)
            continue
        assert positive, f"{ex.id}: no window holds the answer"
        texts = {span_text(ex, f) for f in positive}
        assert len(texts) == 1 and ex.answers[0].text in texts.pop()
        inexact += span_text(ex, positive[0]) != ex.answers[0].text
        assert all(f["end_positions"] == 0 for f in windows if f["start_positions"] == 0)
        covered = set()
        for f in windows:
            assert len(f["input_ids"]) <= 64
            for offset in filter(None, f["offsets"]):
                covered.update(range(*offset))
        assert {i for i, c in enumerate(ex.context) if not c.isspace()} <= covered
        context_spans = [[o for o in f["offsets"] if o] for f in windows]
        for before, after in zip(context_spans, context_spans[1:], strict=False):
            assert before[-24:] == after[:24]  # consecutive windows share doc_stride tokens
    assert stats["inexact_answers"] == inexact
    assert inexact == 0 if tokenizer.sep_token else 0 < inexact < len(examples) / 10


def test_long_question_is_cut_and_counted(tokenizer):
    question = "Who, according to the long text about the Eiffel Tower and Paris and its history, " * 4 + "built it?"
    features, stats = encode_qa(tokenizer, [example("q", question, "Gustave Eiffel")], max_length=96, doc_stride=16)
    assert stats["questions_truncated"] == 1
    assert all(sum(o is None for o in f["offsets"]) <= 64 + 3 for f in features)


def test_answer_no_token_covers_is_counted_and_trained_as_no_answer(tokenizer):
    context = "Paris  is big."
    blank = QAExample("ws", "What is between?", context, (Answer(" ", 6),))
    features, stats = encode_qa(tokenizer, [blank], max_length=32, doc_stride=8)
    assert stats["unmapped_answers"] == 1
    assert (features[0]["start_positions"], features[0]["end_positions"]) == (0, 0)


def test_answer_inside_a_token_is_counted_as_inexact():
    bert = load_tokenizer(minilm_folder())
    context = "They played football all day."
    inside = QAExample("in", "Which ball?", context, (Answer("ball", context.index("ball")),))
    features, stats = encode_qa(bert, [inside], max_length=32, doc_stride=8)
    assert stats["inexact_answers"] == 1 and span_text(inside, features[0]) == "football"


def test_window_budget_must_exceed_the_stride(tokenizer):
    with pytest.raises(ValueError, match="doc_stride"):
        encode_qa(tokenizer, HAND_MADE, max_length=32, doc_stride=30)


def peaked_logits(features, answerable_peak=8.0, null_peak=0.0):
    """Logits of a model sure of the gold span: `answerable_peak` at the answer's start and end tokens,
    `null_peak` at index 0 of windows without the answer, small noise elsewhere."""
    rng = np.random.default_rng(0)
    starts, ends = [], []
    for f in features:
        start, end = rng.normal(0, 0.1, len(f["input_ids"])), rng.normal(0, 0.1, len(f["input_ids"]))
        if f["start_positions"]:
            start[f["start_positions"]] = end[f["end_positions"]] = answerable_peak
        else:
            start[0] = end[0] = null_peak
        starts.append(start)
        ends.append(end)
    return starts, ends


def test_decoding_peaks_on_gold_spans_returns_the_gold_answers(tokenizer, examples):
    features, _ = encode_qa(tokenizer, examples, max_length=64, doc_stride=24)
    starts, ends = peaked_logits(features)
    width = max(len(f["input_ids"]) for f in features)  # also as a padded tensor, as a model returns them
    padded = [
        torch.stack([torch.tensor(np.pad(r, (0, width - len(r)), constant_values=-1e4)) for r in rows])
        for rows in (starts, ends)
    ]
    for start_logits, end_logits in ((starts, ends), padded):
        answers, n_best = decode_qa(examples, features, start_logits, end_logits, max_answer_length=30)
        for index, ex in enumerate(examples):
            if not ex.is_impossible:
                gold = gold_span_text(ex, index, features)
                assert answers[ex.id] == n_best[ex.id][0]["text"] == gold
                assert ex.answers[0].text in gold
                assert n_best[ex.id][0]["score"] == pytest.approx(16.0, abs=0.5)


def test_version_2_predicts_no_answer_when_the_null_score_wins(tokenizer, examples):
    features, _ = encode_qa(tokenizer, examples, max_length=64, doc_stride=24)
    starts, ends = peaked_logits(features, answerable_peak=8.0, null_peak=5.0)
    answers, n_best = decode_qa(examples, features, starts, ends, version_2=True)
    for index, ex in enumerate(examples):
        assert answers[ex.id] == ("" if ex.is_impossible else gold_span_text(ex, index, features))
        assert "" in [c["text"] for c in n_best[ex.id]]
    # the null answer must beat the best span by more than null_threshold
    emptied, _ = decode_qa(examples, features, starts, ends, version_2=True, null_threshold=-100.0)
    assert all(answer == "" for answer in emptied.values())
    kept, _ = decode_qa(examples, features, starts, ends, version_2=True, null_threshold=100.0)
    assert all(answer != "" for answer in kept.values())
    v1, _ = decode_qa(examples, features, starts, ends, version_2=False)
    assert all(v1[ex.id] != "" for ex in examples)


def test_spans_longer_than_max_answer_length_are_not_predicted():
    bert = load_tokenizer(minilm_folder())
    gold = "the company of Gustave Eiffel"
    features, _ = encode_qa(bert, [example("long", "Who built it?", gold)], max_length=384, doc_stride=128)
    (feature,) = features
    n_tokens = feature["end_positions"] - feature["start_positions"] + 1
    starts, ends = peaked_logits(features)
    answers, _ = decode_qa([example("long", "Who built it?", gold)], features, starts, ends, max_answer_length=n_tokens)
    assert answers["long"] == gold
    answers, n_best = decode_qa(
        [example("long", "Who built it?", gold)], features, starts, ends, max_answer_length=n_tokens - 1
    )
    assert answers["long"] != gold and len(answers["long"]) < len(gold)
    assert all(c["text"] != gold for c in n_best["long"])
