"""Readers for labelled task data: classification, parallel text and instruction data.

Each reader turns a file in a common layout into small frozen dataclasses, so the fine-tuning recipes
(`lmforge.tasks`) see one record type per task whatever the file looked like:

- `ClassificationExample`: text (or a text pair) and its labels, from CSV, TSV or JSONL;
  single-label or multi-label; `LabelVocab` maps label strings to ids.
- `ParallelExample`: a source/target sentence pair, from a two-column TSV or two aligned files.
- `InstructionExample`: a conversation (a tuple of `Message`), from alpaca-style JSONL
  (`instruction`, `input`, `output`) or chat JSONL (`messages`).

Token tagging (CoNLL, `word/TAG`) lives in `lmforge.data.readers.conll`, extractive QA (SQuAD) in
`lmforge.data.readers.squad`, and sets derived from real corpora in `lmforge.data.corpora.derived`.

Readers stream line by line, so memory stays flat on large files. Malformed input raises
`DataFormatError` (a ValueError) whose message starts with `file:line:` and says what to change;
a missing file raises FileNotFoundError.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.io import write_json_atomic


class DataFormatError(ValueError):
    """A malformed file or record. The message starts with `file:line:` (or `file:` when the problem
    is the file as a whole) so an editor can jump to it."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line with its newline) for each line of a UTF-8 text file.

    Decodes line by line so an invalid byte is reported with its line; a leading BOM is dropped;
    a NUL byte means the file is binary, not text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + ("" if not path.exists() else " (it is a directory)"))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if b"\x00" in raw:
                raise DataFormatError(path, lineno, "contains NUL bytes: this looks like a binary file, not text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    path, lineno, f"not valid UTF-8 (byte {e.start} of the line); re-save the file as UTF-8"
                ) from None
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield lineno, line


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; every line must hold an object."""
    seen_any = False
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        seen_any = True
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, f"not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, found {type(record).__name__}")
        yield lineno, record
    if not seen_any:
        raise DataFormatError(path, None, "file is empty; expected one JSON object per line")


# ----------------------------------------------------------------------------------------------------
# Classification


@dataclass(frozen=True)
class ClassificationExample:
    """One classification example.

    `labels` is always a tuple: one label for single-label data, any number (even none) for
    multi-label data. Labels are strings; integer labels keep their decimal form ("0", "-1"), so one
    vocabulary type serves both. `text_pair` holds the second text of sentence-pair tasks (NLI,
    paraphrase), else None."""

    text: str
    labels: tuple[str, ...]
    text_pair: str | None = None

    @property
    def label(self) -> str:
        """The single label of a single-label example."""
        if len(self.labels) != 1:
            raise ValueError(f"example has {len(self.labels)} labels {list(self.labels)}; use .labels for multi-label")
        return self.labels[0]


def _is_int(s: str) -> bool:
    return s.lstrip("+-").isdigit()


@dataclass(frozen=True)
class LabelVocab:
    """Label strings <-> ids. Built deterministically: labels sorted numerically when every label is an
    integer (so 0..K-1 keep their own value as id, and "10" comes after "9"), else sorted as strings.
    Store it with the model (`to_dict`/`save`) so predictions map back to the same names."""

    labels: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        ids = {label: i for i, label in enumerate(self.labels)}
        if len(ids) != len(self.labels):
            raise ValueError(f"label vocabulary has duplicate labels: {list(self.labels)}")
        object.__setattr__(self, "_ids", ids)

    @classmethod
    def build(cls, examples: Iterable[ClassificationExample | Sequence[str]]) -> LabelVocab:
        """The sorted set of labels seen in `examples` (ClassificationExample or label sequences)."""
        seen = set()
        for ex in examples:
            seen.update(ex.labels if isinstance(ex, ClassificationExample) else ex)
        if all(_is_int(label) for label in seen):
            return cls(tuple(sorted(seen, key=int)))
        return cls(tuple(sorted(seen)))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: str) -> bool:
        return label in self._ids

    def id(self, label: str) -> int:
        if label not in self._ids:
            known = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise KeyError(f"label {label!r} is not in the label vocabulary ({known})")
        return self._ids[label]

    def encode(self, labels: Iterable[str]) -> list[int]:
        return [self.id(label) for label in labels]

    def multi_hot(self, labels: Iterable[str]) -> list[float]:
        """A 0/1 vector of length len(self), the target of a multi-label (sigmoid) head."""
        vector = [0.0] * len(self.labels)
        for label in labels:
            vector[self.id(label)] = 1.0
        return vector

    def to_dict(self) -> dict:
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelVocab:
        return cls(tuple(str(label) for label in d["labels"]))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelVocab:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"format={format!r} is not supported; use csv, tsv or jsonl")
        return format
    suffix = path.suffix.lower()
    found = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if suffix not in found:
        raise ValueError(f"{path}: unknown suffix {suffix!r}; pass format='csv', 'tsv' or 'jsonl'")
    return found[suffix]


def _iter_table(path: Path, delimiter: str, column_names: Sequence[str] | None) -> Iterator[tuple[int, dict]]:
    """(first line of the record, {column: value}) for each row of a CSV/TSV file with a header row, or
    with `column_names` when the file has none. TSV is read without quoting (as GLUE ships it)."""
    lines = (line for _, line in iter_lines(path))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = list(column_names) if column_names is not None else None
    previous_end = 0
    seen_any = False
    try:
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            seen_any = True
            if header is None:
                header = [name.strip() for name in row]
                continue
            if len(row) != len(header):
                raise DataFormatError(
                    path, start, f"row has {len(row)} fields but the header has {len(header)} ({', '.join(header)})"
                )
            yield start, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise DataFormatError(path, reader.line_num, f"malformed CSV ({e})") from None
    if not seen_any:
        raise DataFormatError(path, None, "file is empty; expected a header row and one row per example")


def _label_values(value, multi_label: bool, separator: str, path: Path, line: int, name: str) -> tuple[str, ...]:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataFormatError(path, line, f"missing label in field {name!r}; every example needs a label")
    if isinstance(value, list):
        if not multi_label:
            raise DataFormatError(path, line, f"field {name!r} holds a list; pass multi_label=True")
        items = value
    elif multi_label and isinstance(value, str):
        items = value.split(separator)
    else:
        items = [value]
    labels = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise DataFormatError(path, line, f"label {item!r} in field {name!r} must be a string or an integer")
        label = str(item).strip()
        if not label:
            raise DataFormatError(path, line, f"empty label in field {name!r} (value {value!r})")
        labels.append(label)
    return tuple(labels)


def _text_value(record: dict, name: str, path: Path, line: int) -> str:
    value = record[name]
    if value is None:
        raise DataFormatError(path, line, f"field {name!r} is null; every example needs its text")
    if not isinstance(value, str):
        raise DataFormatError(path, line, f"field {name!r} must be a string, found {type(value).__name__}")
    return value.strip()


def read_classification(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    multi_label: bool = False,
    label_separator: str = "|",
    format: str | None = None,
    column_names: Sequence[str] | None = None,
) -> Iterator[ClassificationExample]:
    """Streams the examples of a CSV, TSV or JSONL classification file (format from the suffix unless given).

    CSV/TSV files name their columns in a header row, or pass `column_names` for a file without one
    (e.g. the Pang & Lee CSVs: `column_names=["label", "text"]`). Multi-label data holds a list in
    JSONL or a `label_separator`-joined string ("sports|politics"); a JSONL `[]` means "no labels",
    while a missing, null or empty label is an error. Texts are stripped of surrounding whitespace."""
    options = dict(text_field=text_field, label_field=label_field, text_pair_field=text_pair_field)
    options.update(multi_label=multi_label, label_separator=label_separator, format=format, column_names=column_names)
    yield from (example for _, example in _iter_classification(path, **options))


def _iter_classification(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    label_field: str = "label",
    text_pair_field: str | None = None,
    multi_label: bool = False,
    label_separator: str = "|",
    format: str | None = None,
    column_names: Sequence[str] | None = None,
) -> Iterator[tuple[int, ClassificationExample]]:
    path = Path(path)
    fmt = _format_of(path, format)
    if fmt == "jsonl":
        if column_names is not None:
            raise ValueError("column_names is for CSV/TSV files without a header; JSONL records name their fields")
        records = iter_jsonl(path)
    else:
        records = _iter_table(path, "," if fmt == "csv" else "\t", column_names)
    wanted = [text_field, label_field] + ([text_pair_field] if text_pair_field else [])
    for line, record in records:
        missing = [name for name in wanted if name not in record]
        if missing:
            found = ", ".join(record) or "none"
            kind = "column" if fmt != "jsonl" else "field"
            raise DataFormatError(
                path, line, f"no {kind} {missing[0]!r}; {kind}s found: {found} (choose with --text-field/--label-field)"
            )
        labels = _label_values(record[label_field], multi_label, label_separator, path, line, label_field)
        text = _text_value(record, text_field, path, line)
        pair = _text_value(record, text_pair_field, path, line) if text_pair_field else None
        yield line, ClassificationExample(text=text, labels=labels, text_pair=pair)


@dataclass
class ClassificationSet:
    """The examples of one file and the label vocabulary they use."""

    examples: list[ClassificationExample]
    label_vocab: LabelVocab


def load_classification(
    path: str | os.PathLike, *, label_vocab: LabelVocab | None = None, **options
) -> ClassificationSet:
    """All examples of a classification file (options as in `read_classification`) with their label
    vocabulary. Pass the training set's `label_vocab` when loading a dev/test file: a label it does not
    know is then an error with its line, instead of a silently different id mapping."""
    examples = []
    for line, example in _iter_classification(path, **options):
        if label_vocab is not None:
            unknown = [label for label in example.labels if label not in label_vocab]
            if unknown:
                raise DataFormatError(
                    path, line, f"label {unknown[0]!r} is not in the training labels {list(label_vocab.labels)}"
                )
        examples.append(example)
    if not examples:
        raise DataFormatError(path, None, "no examples after the header")
    return ClassificationSet(examples, label_vocab or LabelVocab.build(examples))


# ----------------------------------------------------------------------------------------------------
# Parallel text


@dataclass(frozen=True)
class ParallelExample:
    """A sentence and its translation."""

    source: str
    target: str


def read_parallel_tsv(path: str | os.PathLike) -> Iterator[ParallelExample]:
    """Streams `source<TAB>target` lines; blank lines are skipped, any other line must have exactly two columns."""
    seen_any = False
    for lineno, line in iter_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        seen_any = True
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataFormatError(path, lineno, f"expected 2 columns (source, target), found {len(columns)}")
        yield ParallelExample(columns[0].strip(), columns[1].strip())
    if not seen_any:
        raise DataFormatError(path, None, "file is empty; expected source<TAB>target lines")


def _count_lines(path: Path) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def read_parallel_files(source_path: str | os.PathLike, target_path: str | os.PathLike) -> Iterator[ParallelExample]:
    """Streams line i of `source_path` with line i of `target_path`. The line counts are checked before
    the first pair, since one missing line would shift every later pair."""
    source_path, target_path = Path(source_path), Path(target_path)
    n_source, n_target = _count_lines(source_path), _count_lines(target_path)
    if n_source == 0:
        raise DataFormatError(source_path, None, "file is empty")
    if n_target == 0:
        raise DataFormatError(target_path, None, "file is empty")
    if n_source != n_target:
        raise ValueError(
            f"parallel files are not aligned: {source_path} has {n_source} lines, {target_path} has {n_target}; "
            "line i of one must translate line i of the other"
        )
    for (_, source), (_, target) in zip(iter_lines(source_path), iter_lines(target_path), strict=True):
        yield ParallelExample(source.strip(), target.strip())


# ----------------------------------------------------------------------------------------------------
# Instruction data

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class InstructionExample:
    """A conversation: an optional system message, then user and assistant turns alternating, ending
    with the assistant (the text the model learns to produce)."""

    messages: tuple[Message, ...]


def _check_conversation(messages: list[Message], path: Path, line: int) -> None:
    if not messages:
        raise DataFormatError(path, line, "'messages' is empty")
    turns = messages[1:] if messages[0].role == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            where = i + (len(messages) - len(turns))
            raise DataFormatError(
                path,
                line,
                f"message {where} has role {message.role!r} where {expected!r} was expected; after an optional "
                "first system message, user and assistant must alternate starting with user",
            )
    if not turns or turns[-1].role != "assistant":
        raise DataFormatError(path, line, "the conversation must end with an assistant message (the training target)")


def _messages_from_chat(record: dict, path: Path, line: int) -> list[Message]:
    raw = record["messages"]
    if not isinstance(raw, list):
        raise DataFormatError(path, line, f"'messages' must be a list of {{role, content}}, found {type(raw).__name__}")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise DataFormatError(path, line, f"message {i} must be an object with 'role' and 'content': {item!r}")
        if item["role"] not in ROLES:
            raise DataFormatError(
                path, line, f"message {i} has unknown role {item['role']!r}; roles: {', '.join(ROLES)}"
            )
        if not isinstance(item["content"], str):
            raise DataFormatError(path, line, f"message {i} 'content' must be a string")
        messages.append(Message(item["role"], item["content"]))
    return messages


def _messages_from_alpaca(record: dict, path: Path, line: int) -> list[Message]:
    for name in ("instruction", "output"):
        if not isinstance(record.get(name), str):
            raise DataFormatError(path, line, f"alpaca record needs a string {name!r} (fields: {', '.join(record)})")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataFormatError(path, line, "alpaca field 'input' must be a string")
    prompt = record["instruction"] + ("\n\n" + extra if extra.strip() else "")
    return [Message("user", prompt), Message("assistant", record["output"])]


def read_instructions(path: str | os.PathLike) -> Iterator[InstructionExample]:
    """Streams instruction-tuning conversations from JSONL. Each line is either chat-style
    (`{"messages": [{"role": ..., "content": ...}, ...]}`) or alpaca-style (`instruction`, optional
    `input`, `output`; the input is appended to the instruction after a blank line); both become an
    `InstructionExample`. Roles are checked (see `InstructionExample`)."""
    path = Path(path)
    for line, record in iter_jsonl(path):
        if "messages" in record:
            messages = _messages_from_chat(record, path, line)
        elif "instruction" in record:
            messages = _messages_from_alpaca(record, path, line)
        else:
            raise DataFormatError(
                path,
                line,
                f"neither 'messages' (chat) nor 'instruction' (alpaca) found; fields: {', '.join(record) or 'none'}",
            )
        _check_conversation(messages, path, line)
        yield InstructionExample(tuple(messages))
