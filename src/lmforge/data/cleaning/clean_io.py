"""Reading documents for the cleaning pipeline one at a time, and opening its (compressed) output.

Input layouts (`--format`):

- `txt-blank` (default for text files): documents are separated by one or more blank lines, so a
  paragraph, a play's speech or an e-mail is one document and keeps its line breaks.
- `txt-lines`: one document per line (blank lines are ignored), the layout of most web-text dumps.
- `jsonl`: one JSON object per line, the text under `text_field` (default "text"); the other fields are
  carried through to JSONL output. Chosen automatically for `.jsonl`, `.ndjson` and `.json` names.

Any of them may be compressed: `.gz`, `.bz2` and `.zst` are decompressed on the fly. Files are read as
a stream of lines, so a file larger than memory is fine.

Bad input is refused with one line naming the file (and line) and the fix: a missing, empty or binary
file (NUL bytes, or mostly undecodable bytes, in its first KB), a corrupt archive, a malformed JSONL
line, a missing or non-string text field. Invalid UTF-8 follows `on_invalid_utf8`: `replace` puts
U+FFFD in place of the bad bytes, `skip` drops the document holding them, `fail` stops at the first
one; replaced and skipped documents are counted in `ReadStats`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import zstandard

INPUT_FORMATS = ("auto", "txt-blank", "txt-lines", "jsonl")
OUTPUT_FORMATS = ("auto", "jsonl", "txt")
INVALID_UTF8_POLICIES = ("replace", "skip", "fail")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_SNIFF_BYTES = 1024


@dataclass
class ReadStats:
    """What reading saw: documents yielded, and documents with invalid UTF-8 replaced or skipped."""

    documents: int = 0
    chars: int = 0
    invalid_utf8_replaced: int = 0
    invalid_utf8_skipped: int = 0


@dataclass
class Document:
    """One document: its text, its JSON record when read from JSONL (else None), and its first line number."""

    text: str
    record: dict | None = None
    line: int = 0


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def resolve_input_format(path: Path, fmt: str = "auto") -> str:
    """`fmt`, or for "auto": jsonl for .jsonl/.ndjson/.json names (before any compression suffix), else txt-blank."""
    if fmt not in INPUT_FORMATS:
        raise ValueError(f"input format {fmt!r} is unknown; choose one of {', '.join(INPUT_FORMATS)}")
    if fmt != "auto":
        return fmt
    return "jsonl" if _base_suffix(path) in JSONL_SUFFIXES else "txt-blank"


def resolve_output_format(path: Path, fmt: str = "auto") -> str:
    """`fmt`, or for "auto": jsonl for .jsonl/.ndjson/.json names, else txt."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is unknown; choose one of {', '.join(OUTPUT_FORMATS)}")
    if fmt != "auto":
        return fmt
    return "jsonl" if _base_suffix(path) in JSONL_SUFFIXES else "txt"


def open_binary(path: Path) -> IO[bytes]:
    """`path` opened for reading bytes, decompressed according to its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


def _read_head(path: Path) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read(_SNIFF_BYTES)
    except (OSError, EOFError, zstandard.ZstdError) as error:
        raise ValueError(f"{path} is not a readable {path.suffix} file ({error}); check the file or its name") from None


def check_input(path: Path) -> None:
    """Raises FileNotFoundError / ValueError for a missing, empty or binary input file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give one text or JSONL file")
    head = _read_head(path)
    if not head:
        raise ValueError(f"{path} is empty; give a file with at least one document")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in head:
        raise ValueError(f"{path} looks binary (NUL bytes in its first KB); give a UTF-8 text or JSONL file")
    undecodable = len(head.decode("utf-8", "ignore").encode("utf-8")) < 0.9 * len(head) - 3
    if undecodable:
        raise ValueError(
            f"{path} looks binary (over 10% of its first KB is not UTF-8); give a UTF-8 text or JSONL file"
        )


def _decoded_lines(path: Path, policy: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, line without its line break, had invalid UTF-8) for each line of `path`."""
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                raw = raw.rstrip(b"\r\n")
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield lineno, raw.decode("utf-8"), False
                except UnicodeDecodeError as error:
                    if policy == "fail":
                        raise ValueError(
                            f"{path}:{lineno}: invalid UTF-8 at byte {error.start + 1} of the line; "
                            "use --on-invalid-utf8 replace or skip"
                        ) from None
                    yield lineno, raw.decode("utf-8", "replace"), True
    except (OSError, EOFError, zstandard.ZstdError) as error:
        raise ValueError(f"{path} is truncated or corrupt ({error}); check the file") from None


def _fix_surrogates(text: str) -> tuple[str, bool]:
    """JSON can encode lone surrogates (\\ud800) that are not valid Unicode text; treat them as invalid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), True
    return text, False


def _jsonl_documents(path: Path, text_field: str, policy: str) -> Iterator[tuple[Document, bool]]:
    for lineno, line, bad in _decoded_lines(path, policy):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{lineno}: malformed JSON ({error.msg} at column {error.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            keys = ", ".join(map(repr, list(record)[:8])) or "none"
            raise ValueError(
                f"{path}:{lineno}: no {text_field!r} field (keys: {keys}); choose the field with --text-field"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string")
        text, surrogates = _fix_surrogates(text)
        if surrogates and policy == "fail":
            raise ValueError(
                f"{path}:{lineno}: lone surrogate in {text_field!r}; use --on-invalid-utf8 replace or skip"
            )
        yield Document(text, record, lineno), bad or surrogates


def _text_documents(path: Path, blank_separated: bool, policy: str) -> Iterator[tuple[Document, bool]]:
    lines: list[str] = []
    first, bad = 0, False
    for lineno, line, line_bad in _decoded_lines(path, policy):
        if not blank_separated:
            if line.strip():
                yield Document(line, None, lineno), line_bad
            continue
        if line.strip():
            lines.append(line)
            first = first or lineno
            bad = bad or line_bad
        elif lines:
            yield Document("\n".join(lines), None, first), bad
            lines, first, bad = [], 0, False
    if lines:
        yield Document("\n".join(lines), None, first), bad


def read_documents(
    path: str | Path,
    fmt: str = "auto",
    text_field: str = "text",
    on_invalid_utf8: str = "replace",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Documents of `path`, one at a time (see the module docstring for layouts and error handling).

    The file is checked (exists, not empty, not binary) right away; the iterator raises ValueError at a
    malformed line, or at the end when the file held no document at all."""
    path = Path(path)
    if on_invalid_utf8 not in INVALID_UTF8_POLICIES:
        raise ValueError(f"on_invalid_utf8={on_invalid_utf8!r} is unknown; choose one of {INVALID_UTF8_POLICIES}")
    fmt = resolve_input_format(path, fmt)
    check_input(path)
    if fmt == "jsonl":
        documents = _jsonl_documents(path, text_field, on_invalid_utf8)
    else:
        documents = _text_documents(path, fmt == "txt-blank", on_invalid_utf8)
    return _counted(path, documents, on_invalid_utf8 == "skip", stats if stats is not None else ReadStats())


def _counted(
    path: Path, documents: Iterator[tuple[Document, bool]], skip_bad: bool, stats: ReadStats
) -> Iterator[Document]:
    for document, bad in documents:
        if bad and skip_bad:
            stats.invalid_utf8_skipped += 1
            continue
        stats.invalid_utf8_replaced += bad
        stats.documents += 1
        stats.chars += len(document.text)
        yield document
    if stats.documents == 0 and stats.invalid_utf8_skipped == 0:
        raise ValueError(f"{path} holds no documents (only blank lines); give a file with at least one document")


def open_text_for_writing(path: Path) -> IO[str]:
    """A UTF-8 text stream (LF line ends) writing `path`, compressed by its suffix (.gz, .bz2, .zst) or not."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "wt", encoding="utf-8", newline="\n")
    if suffix == ".bz2":
        return bz2.open(path, "wt", encoding="utf-8", newline="\n")
    if suffix == ".zst":
        return zstandard.open(path, "wt", encoding="utf-8", newline="\n")
    return open(path, "w", encoding="utf-8", newline="\n")
