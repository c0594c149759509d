"""Extractive question answering in the SQuAD JSON layout (v1.1 and v2.0).

The file nests `data[] -> paragraphs[] -> qas[]`: each paragraph has a `context`, each question an
`id`, a `question` and `answers` (`text` and `answer_start`, a character offset into the context).
SQuAD 2.0 adds `is_impossible`: such a question has no answer in its context (its `answers` is empty;
`plausible_answers` is ignored). `read_squad` flattens the file into `QAExample`s and checks each
answer is really at its offset, `context[answer_start : answer_start + len(text)] == text`, because
the span labels of QA fine-tuning are computed from that offset: a wrong one trains the model on the
wrong span without any error.

Reference: Rajpurkar et al., 2016 (SQuAD) and 2018 (SQuAD 2.0, "Know What You Don't Know").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.readers.records import DataFormatError
from lmforge.io import write_json_atomic


@dataclass(frozen=True)
class Answer:
    text: str
    answer_start: int

    @property
    def answer_end(self) -> int:
        """Exclusive character end of the answer in its context."""
        return self.answer_start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    """One question about one context. `answers` holds every reference answer (dev sets have several);
    it is empty exactly when `is_impossible`."""

    id: str
    question: str
    context: str
    answers: tuple[Answer, ...]
    is_impossible: bool = False
    title: str = ""


@dataclass
class SquadSet:
    """The questions of one SQuAD file, its version, and the ids skipped by `on_error="skip"`."""

    examples: list[QAExample]
    version: str
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped_ids)


def _need(obj, key: str, kind: type | tuple, path: Path, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(path, None, f"{where}: missing {key!r}; is this a SQuAD JSON file?")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataFormatError(path, None, f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _answer_problem(context: str, answer: Answer) -> str | None:
    found = context[answer.answer_start : answer.answer_end]
    if answer.answer_start < 0 or found != answer.text:
        return f"answer {answer.text!r} is not at answer_start {answer.answer_start} of its context (found {found!r})"
    return None


def read_squad(path: str | os.PathLike, *, on_error: str = "raise") -> SquadSet:
    """Reads a SQuAD v1.1 or v2.0 JSON file. A question whose answer is not at its `answer_start` is an
    error naming the question id, or with `on_error="skip"` is left out and its id counted in
    `skipped_ids`. Malformed structure is always an error."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r} is not supported; use 'raise' or 'skip'")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError(path, None, "file is empty; expected SQuAD JSON ({'data': [...]})")
    try:
        root = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(path, line, "not valid UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
    articles = _need(root, "data", list, path, "top level")
    has_v2_field = False
    examples, skipped, seen_ids = [], [], set()
    for i, article in enumerate(articles):
        where = f"data[{i}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for j, paragraph in enumerate(_need(article, "paragraphs", list, path, where)):
            pwhere = f"{where}.paragraphs[{j}]"
            context = _need(paragraph, "context", str, path, pwhere)
            for k, qa in enumerate(_need(paragraph, "qas", list, path, pwhere)):
                qwhere = f"{pwhere}.qas[{k}]"
                qid = str(_need(qa, "id", (str, int), path, qwhere))
                if qid in seen_ids:
                    raise DataFormatError(
                        path, None, f"{qwhere}: question id {qid!r} appears twice; ids must be unique"
                    )
                seen_ids.add(qid)
                question = _need(qa, "question", str, path, qwhere)
                has_v2_field = has_v2_field or "is_impossible" in qa
                impossible = bool(qa.get("is_impossible", False))
                answers = []
                for a, item in enumerate(_need(qa, "answers", list, path, qwhere)):
                    awhere = f"{qwhere}.answers[{a}]"
                    answers.append(
                        Answer(_need(item, "text", str, path, awhere), _need(item, "answer_start", int, path, awhere))
                    )
                if impossible and answers:
                    raise DataFormatError(
                        path, None, f"question {qid!r} is_impossible but has answers; move them to plausible_answers"
                    )
                if not impossible and not answers:
                    raise DataFormatError(
                        path, None, f"question {qid!r} has no answers and is not marked is_impossible"
                    )
                problem = next((p for p in (_answer_problem(context, ans) for ans in answers) if p), None)
                if problem and on_error == "raise":
                    raise DataFormatError(
                        path, None, f"question {qid!r}: {problem}; fix it or read with on_error='skip'"
                    )
                if problem:
                    skipped.append(qid)
                    continue
                examples.append(QAExample(qid, question, context, tuple(answers), impossible, title))
    if not examples and not skipped:
        raise DataFormatError(path, None, "no questions found under data[].paragraphs[].qas[]")
    version = str(root.get("version") or ("v2.0" if has_v2_field else "1.1"))
    return SquadSet(examples, version, skipped)


def write_squad(examples: Iterable[QAExample], path: str | os.PathLike, *, version: str | None = None) -> int:
    """Writes examples as SQuAD JSON, atomically, grouping questions that share a title and context into
    one paragraph (in first-seen order). `version` defaults to "v2.0" when any question is impossible,
    else "1.1"; v2.0 files get `is_impossible` on every question. Returns the number of questions."""
    examples = list(examples)
    for ex in examples:
        for answer in ex.answers:
            problem = _answer_problem(ex.context, answer)
            if problem:
                raise ValueError(f"question {ex.id!r}: {problem}; refusing to write a wrong offset")
    if version is None:
        version = "v2.0" if any(ex.is_impossible for ex in examples) else "1.1"
    v2 = version.lstrip("v").startswith("2")
    if not v2 and any(ex.is_impossible for ex in examples):
        raise ValueError(f"version {version!r} cannot hold impossible questions; use version='v2.0'")
    articles: dict[str, dict[str, list]] = {}
    for ex in examples:
        qa = {"id": ex.id, "question": ex.question}
        qa["answers"] = [{"text": a.text, "answer_start": a.answer_start} for a in ex.answers]
        if v2:
            qa["is_impossible"] = ex.is_impossible
        articles.setdefault(ex.title, {}).setdefault(ex.context, []).append(qa)
    data = [
        {"title": title, "paragraphs": [{"context": context, "qas": qas} for context, qas in paragraphs.items()]}
        for title, paragraphs in articles.items()
    ]
    write_json_atomic(path, {"version": version, "data": data}, indent=1, ensure_ascii=False)
    return len(examples)
