"""Task sets derived from real tagged text, for tasks with no public data set available offline.

No real NER or SQuAD-style QA corpus can be fetched from a package registry, so lmforge derives
small, clearly named stand-ins from the Penn Treebank WSJ sentences the catalog ships (`wsj-pos`:
1,001 lines, POS-tagged by hand). They exercise the same formats, heads and metrics as the real
tasks; scores on them say nothing about real NER or reading comprehension.

- **wsj-ner-derived** (`ner_proxy_from_pos`): every maximal run of proper-noun tags (NNP, NNPS)
  becomes one entity of the single type `PROPN`, in IOB2. A proxy for NER, not NER annotation: it has
  no PER/ORG/LOC types, marks titles and months ("Mr.", "Nov.") and misses entities tagged otherwise.
- **squad-derived** (`cloze_qa_from_tagged`): templated cloze questions over real sentences. For each
  sentence (the context) a proper-noun run or a number (CD run) that occurs once in it is the answer;
  the question quotes the words around it with the answer blanked out ("Which name fills the blank
  in this text: ___, 61 years old, will"), and `answer_start` is the answer's exact character offset
  in the context. Optionally some questions are unanswerable (SQuAD 2.0 style): a question made for
  another sentence, asked about a context that does not contain its answer.

Both are deterministic functions of their input (and a seed), written as functions over plain
records so they can be tested on hand-made sentences and built from any POS-tagged corpus.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmforge.data.readers.conll import TaggedSentence, spans_to_bio, write_conll
from lmforge.data.readers.squad import Answer, QAExample, write_squad
from lmforge.io import write_text_atomic

PROPER_NOUN_TAGS = frozenset({"NNP", "NNPS"})
NUMBER_TAGS = frozenset({"CD"})
NER_PROXY_TYPE = "PROPN"

QUESTION_TEMPLATES = {
    "name": "Which name fills the blank in this text: {cloze}",
    "number": "What number fills the blank in this text: {cloze}",
}
BLANK = "___"


def tag_runs(tags: Sequence[str], wanted: frozenset[str]) -> list[tuple[int, int]]:
    """(start, end-exclusive) of each maximal run of consecutive tags in `wanted`."""
    runs, start = [], None
    for i, tag in enumerate([*tags, None]):
        if tag in wanted and start is None:
            start = i
        elif tag not in wanted and start is not None:
            runs.append((start, i))
            start = None
    return runs


def ner_proxy_from_pos(sentence: TaggedSentence, entity_type: str = NER_PROXY_TYPE) -> TaggedSentence:
    """The sentence with IOB2 tags marking each run of NNP/NNPS tokens as one `entity_type` entity."""
    spans = [(entity_type, start, end) for start, end in tag_runs(sentence.tags, PROPER_NOUN_TAGS)]
    return TaggedSentence(sentence.tokens, tuple(spans_to_bio(spans, len(sentence.tokens))))


def wsj_ner_derived(sentences: Iterable[TaggedSentence]) -> list[TaggedSentence]:
    """`ner_proxy_from_pos` over a POS-tagged corpus (the recipe behind the `wsj-ner-derived` set)."""
    return [ner_proxy_from_pos(sentence) for sentence in sentences]


# ----------------------------------------------------------------------------------------------------
# Detokenizing Penn Treebank tokens, keeping each token's character offsets

_SURFACE = {"``": '"', "''": '"', "-LRB-": "(", "-RRB-": ")", "-LCB-": "{", "-RCB-": "}", "-LSB-": "[", "-RSB-": "]"}
_NO_SPACE_BEFORE = {",", ".", ":", ";", "?", "!", "%", ")", "]", "}", "''", "'", "'s", "n't", "'re", "'ve", "'ll", "'d"}
_NO_SPACE_BEFORE |= {"'m", "-rrb-", "-rcb-", "-rsb-"}  # compared lower-cased
_NO_SPACE_AFTER = {"(", "[", "{", "$", "``", "#", "-LRB-", "-LCB-", "-LSB-"}


def detokenize(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Readable text from Penn Treebank tokens ("Vinken , 61 years" -> "Vinken, 61 years"; `` and ''
    become double quotes, -LRB- a parenthesis, "1\\/2" "1/2"), and each token's (start, end) offsets in it."""
    text, offsets = "", []
    for i, token in enumerate(tokens):
        surface = _SURFACE.get(token, token).replace("\\/", "/").replace("\\*", "*")
        glue = i == 0 or token.lower() in _NO_SPACE_BEFORE or tokens[i - 1] in _NO_SPACE_AFTER
        if not glue:
            text += " "
        offsets.append((len(text), len(text) + len(surface)))
        text += surface
    return text, offsets


# ----------------------------------------------------------------------------------------------------
# Cloze QA


def _candidates(sentence: TaggedSentence, context: str, offsets: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(kind, start token, end token) of answer spans that occur exactly once in the context."""
    found = []
    for kind, wanted in (("name", PROPER_NOUN_TAGS), ("number", NUMBER_TAGS)):
        for start, end in tag_runs(sentence.tags, wanted):
            if end - start == len(sentence.tokens):
                continue
            text = context[offsets[start][0] : offsets[end - 1][1]]
            if context.count(text) == 1:
                found.append((kind, start, end))
    return sorted(found, key=lambda c: (c[1], c[2]))


def _question(sentence: TaggedSentence, kind: str, start: int, end: int, window: int) -> str:
    left = list(sentence.tokens[max(0, start - window) : start])
    right = list(sentence.tokens[end : end + window])
    cloze, _ = detokenize([*left, BLANK, *right])
    cloze = cloze.lstrip(",;: ")  # a window that starts mid-clause
    return QUESTION_TEMPLATES[kind].format(cloze=cloze)


def cloze_qa_from_tagged(
    sentences: Sequence[TaggedSentence],
    *,
    seed: int = 0,
    questions_per_context: int = 2,
    unanswerable_fraction: float = 0.0,
    window: int = 6,
    id_prefix: str = "squad-derived",
) -> list[QAExample]:
    """Templated extractive QA over POS-tagged sentences (the recipe behind `squad-derived`).

    Each sentence with at least one usable span becomes a context with up to `questions_per_context`
    questions (spans chosen with `seed`); the question shows `window` tokens either side of the blank.
    With `unanswerable_fraction` p > 0, about a fraction p of the contexts also get one impossible
    question: a question built for a different sentence whose answer text does not occur in this
    context. Same input and seed, same output."""
    if not 0.0 <= unanswerable_fraction <= 1.0:
        raise ValueError(f"unanswerable_fraction={unanswerable_fraction} must be between 0 and 1")
    if questions_per_context < 1 or window < 1:
        raise ValueError("questions_per_context and window must be at least 1")
    rng = random.Random(seed)
    answerable = []  # (sentence index, QAExample)
    contexts = []  # (sentence index, context, its questions)
    for i, sentence in enumerate(sentences):
        context, offsets = detokenize(sentence.tokens)
        candidates = _candidates(sentence, context, offsets)
        if not candidates:
            continue
        questions = []
        contexts.append((i, context, questions))
        chosen = sorted(rng.sample(candidates, min(questions_per_context, len(candidates))), key=lambda c: c[1])
        for k, (kind, start, end) in enumerate(chosen):
            answer = Answer(context[offsets[start][0] : offsets[end - 1][1]], offsets[start][0])
            qid = f"{id_prefix}-{i:05d}-{k}"
            question = _question(sentence, kind, start, end, window)
            questions.append(QAExample(qid, question, context, (answer,), False, f"{id_prefix}-{i:05d}"))
            answerable.append((i, questions[-1]))
    examples = []
    for i, context, questions in contexts:
        examples.extend(questions)
        if unanswerable_fraction and len(answerable) > 1 and rng.random() < unanswerable_fraction:
            others = [ex for j, ex in answerable if j != i and ex.answers[0].text.lower() not in context.lower()]
            if others:
                donor = rng.choice(others)
                qid = f"{id_prefix}-{i:05d}-x"
                examples.append(QAExample(qid, donor.question, context, (), True, f"{id_prefix}-{i:05d}"))
    return examples


# ----------------------------------------------------------------------------------------------------
# Building the sets from the catalog and writing them in the standard formats

_README = """{name}: derived from the catalog's `wsj-pos` set ({source}).
{what}
It is a derived stand-in, not a published benchmark: scores on it say nothing about {task}.
Splits follow wsj-pos (its fixed train/test lines). License of the underlying text: {license}.
Built by lmforge.data.corpora.derived.write_derived_sets(seed={seed}).
"""


def write_derived_sets(out_dir: str | os.PathLike, *, seed: int = 0, unanswerable_fraction: float = 0.25) -> dict:
    """Builds `wsj-ner-derived` and `squad-derived` from each split of the catalog's `wsj-pos` and writes
    them where users can read them: `out_dir/wsj-ner-derived/<split>.conll` (CoNLL, IOB2) and
    `out_dir/squad-derived/<split>.json` (SQuAD v2.0 JSON), each folder with a README saying what the set
    is. Every file is written atomically. Returns {set name: {split: path}}."""
    from lmforge.data.corpora.catalog import load_dataset

    wsj = load_dataset("wsj-pos")
    out_dir = Path(out_dir)
    written: dict[str, dict[str, Path]] = {"wsj-ner-derived": {}, "squad-derived": {}}
    for split, records in wsj.splits.items():
        sentences = [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for r in records]
        path = out_dir / "wsj-ner-derived" / f"{split}.conll"
        write_conll(wsj_ner_derived(sentences), path)
        written["wsj-ner-derived"][split] = path
        qa = cloze_qa_from_tagged(
            sentences, seed=seed, unanswerable_fraction=unanswerable_fraction, id_prefix=f"squad-derived-{split}"
        )
        path = out_dir / "squad-derived" / f"{split}.json"
        write_squad(qa, path, version="v2.0")
        written["squad-derived"][split] = path
    about = {
        "wsj-ner-derived": (
            f"Each maximal run of NNP/NNPS tokens is one entity of type {NER_PROXY_TYPE} (IOB2): a proxy for NER, "
            "not NER annotation.",
            "named-entity recognition",
        ),
        "squad-derived": (
            "Templated cloze questions (a proper-noun run or a number blanked out of its sentence), exact "
            f"answer_start; about {unanswerable_fraction:.0%} of contexts also get an unanswerable question.",
            "reading comprehension",
        ),
    }
    for name, (what, task) in about.items():
        readme = _README.format(name=name, source=wsj.source, what=what, task=task, license=wsj.license, seed=seed)
        write_text_atomic(out_dir / name / "README.txt", readme)
    return written
