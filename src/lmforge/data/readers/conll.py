"""Token-tagging data: CoNLL column files, `word/TAG` text, and BIO (IOB2) tag checks.

A `TaggedSentence` is a tuple of tokens and a tuple of tags of the same length, the input of token
classification (NER, POS tagging, chunking).

CoNLL column format (CoNLL-2000/2003 style): one token per line, columns split on whitespace (or a
given separator), a blank line between sentences, `-DOCSTART-` lines between documents. Which column
holds the token and which the tag is configurable (CoNLL-2003 NER: token 0, tag 3 or -1).

BIO / IOB2: an entity of type X is `B-X` followed by `I-X`s; `O` is outside any entity. Real files
often break the rule (IOB1, as in the original CoNLL-2003, starts an entity with `I-X`). The CoNLL
evaluation script (conlleval) reads such an `I-X` as the start of a new entity, and so do
`bio_spans` here and seqeval's default mode; `repair_bio` rewrites the tags in that reading so they
are valid IOB2, and `read_conll(bio="strict")` reports them instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.readers.records import DataFormatError, iter_lines
from lmforge.io import write_text_atomic

DOCSTART = "-DOCSTART-"


@dataclass(frozen=True)
class TaggedSentence:
    """Tokens and one tag per token."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    def __post_init__(self):
        if len(self.tokens) != len(self.tags):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.tags)} tags; each token needs exactly one tag")


# ----------------------------------------------------------------------------------------------------
# BIO tags


def parse_bio_tag(tag: str) -> tuple[str, str | None]:
    """("O", None) for "O"; ("B", "PER") for "B-PER"; ("I", "PER") for "I-PER"."""
    if tag == "O":
        return "O", None
    prefix, sep, kind = tag.partition("-")
    if prefix not in ("B", "I") or not sep or not kind:
        raise ValueError(f"tag {tag!r} is not BIO; expected O, B-TYPE or I-TYPE")
    return prefix, kind


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, start, end) with `end` exclusive, read as conlleval does: an entity starts at
    `B-X`, or at an `I-X` that does not continue an entity of type X; it ends before `O`, `B-*`, or an
    `I-Y` of another type."""
    spans = []
    kind, start = None, 0
    for i, tag in enumerate(tags):
        prefix, tag_kind = parse_bio_tag(tag)
        if kind is not None and (prefix != "I" or tag_kind != kind):
            spans.append((kind, start, i))
            kind = None
        if prefix != "O" and kind is None:
            kind, start = tag_kind, i
    if kind is not None:
        spans.append((kind, start, len(tags)))
    return spans


def bio_problems(tags: Sequence[str]) -> list[int]:
    """Positions of `I-X` tags that do not continue an `X` entity (an IOB2 violation)."""
    problems = []
    previous = (None, None)
    for i, tag in enumerate(tags):
        prefix, kind = parse_bio_tag(tag)
        if prefix == "I" and (previous[0] == "O" or previous[1] != kind):
            problems.append(i)
        previous = (prefix, kind)
    return problems


def spans_to_bio(spans: Iterable[tuple[str, int, int]], length: int) -> list[str]:
    """IOB2 tags of length `length` for (type, start, end-exclusive) spans, which must not overlap."""
    tags = ["O"] * length
    for kind, start, end in spans:
        if not 0 <= start < end <= length:
            raise ValueError(f"span ({kind}, {start}, {end}) is outside 0..{length} or empty")
        if any(tag != "O" for tag in tags[start:end]):
            raise ValueError(f"span ({kind}, {start}, {end}) overlaps another span")
        tags[start] = f"B-{kind}"
        tags[start + 1 : end] = [f"I-{kind}"] * (end - start - 1)
    return tags


def repair_bio(tags: Sequence[str]) -> list[str]:
    """Valid IOB2 tags with the same entities as `tags` under the conlleval reading (every I-X that
    starts an entity becomes B-X). Converts IOB1 to IOB2."""
    return spans_to_bio(bio_spans(tags), len(tags))


# ----------------------------------------------------------------------------------------------------
# Readers and writers


def _finish(tokens: list, tags: list, lines: list, path: Path, bio: str | None) -> TaggedSentence:
    if bio is not None:
        try:
            problems = bio_problems(tags)
        except ValueError as e:
            bad = next(i for i, tag in enumerate(tags) if not _is_bio(tag))
            raise DataFormatError(path, lines[bad], str(e)) from None
        if problems and bio == "strict":
            i = problems[0]
            raise DataFormatError(
                path,
                lines[i],
                f"tag {tags[i]!r} does not continue an entity (previous tag {tags[i - 1] if i else 'none'!r}); "
                "fix the tag or read with bio='repair'",
            )
        if problems:
            tags = repair_bio(tags)
    return TaggedSentence(tuple(tokens), tuple(tags))


def _is_bio(tag: str) -> bool:
    try:
        parse_bio_tag(tag)
    except ValueError:
        return False
    return True


def read_conll(
    path: str | os.PathLike,
    *,
    token_column: int = 0,
    tag_column: int = -1,
    separator: str | None = None,
    bio: str | None = None,
) -> Iterator[TaggedSentence]:
    """Streams the sentences of a CoNLL column file.

    Every non-blank line must have as many columns as the first one. `-DOCSTART-` lines end the current
    sentence and are dropped. `bio`: None keeps tags as they are (POS tags, chunk tags...); "repair"
    rewrites IOB2 violations as conlleval reads them (see `repair_bio`); "strict" raises on the first
    one, with its line."""
    if bio not in (None, "repair", "strict"):
        raise ValueError(f"bio={bio!r} is not supported; use None, 'repair' or 'strict'")
    path = Path(path)
    n_columns = None
    tokens, tags, lines = [], [], []
    for lineno, line in iter_lines(path):
        columns = line.split(separator) if separator is not None else line.split()
        if separator is not None:
            columns = [c.strip() for c in columns]
        if not line.strip() or columns[0] == DOCSTART:
            if tokens:
                yield _finish(tokens, tags, lines, path, bio)
                tokens, tags, lines = [], [], []
            continue
        if n_columns is None:
            n_columns = len(columns)
            for name, index in (("token_column", token_column), ("tag_column", tag_column)):
                if not -n_columns <= index < n_columns:
                    raise DataFormatError(path, lineno, f"{name}={index} but the line has {n_columns} columns")
        elif len(columns) != n_columns:
            raise DataFormatError(
                path, lineno, f"expected {n_columns} columns (as on the first token line), found {len(columns)}"
            )
        tokens.append(columns[token_column])
        tags.append(columns[tag_column])
        lines.append(lineno)
    if tokens:
        yield _finish(tokens, tags, lines, path, bio)
    if n_columns is None:
        raise DataFormatError(
            path, None, "no token lines (empty, or only -DOCSTART-); expected one 'token ... tag' line per token"
        )


def read_tagged_text(path: str | os.PathLike, *, separator: str = "/") -> Iterator[TaggedSentence]:
    """Streams sentences written one per line as `word/TAG word/TAG ...` (the Penn Treebank tagged-text
    layout). Each token is split on its last `separator`, so words that contain one ("1\\/2/CD") keep it."""
    path = Path(path)
    seen_any = False
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        seen_any = True
        tokens, tags = [], []
        for position, item in enumerate(line.split()):
            word, sep, tag = item.rpartition(separator)
            if not sep or not word or not tag:
                raise DataFormatError(
                    path, lineno, f"token {position} {item!r} is not word{separator}TAG; every token needs its tag"
                )
            tokens.append(word)
            tags.append(tag)
        yield TaggedSentence(tuple(tokens), tuple(tags))
    if not seen_any:
        raise DataFormatError(path, None, f"file is empty; expected sentences of word{separator}TAG tokens")


def write_conll(sentences: Iterable[TaggedSentence], path: str | os.PathLike, *, docstart: bool = False) -> int:
    """Writes `token tag` lines with a blank line after each sentence (optionally after a `-DOCSTART-`
    line), atomically; returns the number of sentences written."""
    parts = [f"{DOCSTART} O\n\n"] if docstart else []
    count = 0
    for sentence in sentences:
        for token, tag in zip(sentence.tokens, sentence.tags, strict=True):
            if not token or any(c.isspace() for c in token + tag):
                raise ValueError(f"token {token!r} / tag {tag!r} is empty or holds whitespace; CoNLL cannot store it")
            parts.append(f"{token} {tag}\n")
        parts.append("\n")
        count += 1
    write_text_atomic(path, "".join(parts))
    return count
