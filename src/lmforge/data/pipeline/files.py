"""Users' own text: a streaming iterator of documents from local files, folders and globs.

Formats, chosen by the file name (a final `.gz`, `.bz2`, `.zst` or `.xz` means compressed, read as a stream):

    .txt .md        the whole file is one document (txt_unit="file"), or one per blank-line separated
                    paragraph ("paragraph"), or one per line ("line")
    .jsonl .ndjson  one JSON object per line; the document is its `text_field`
    .csv .tsv       a header row, then one row per document; the document is the `text_field` column
    .parquet        the `text_field` column (read in batches with pyarrow)

A folder means every supported file under it (recursively, sorted, hidden files skipped); a pattern with
`*`, `?` or `[` is a glob (`**` recurses). Blank documents are skipped and counted.

Bad input stops with one line that names the file (and the line, for line-based formats) and the fix:
a missing path, an empty file, a binary file (a NUL byte in its first 8 KiB), a corrupt compressed stream,
malformed JSON, a record or header without `text_field`. Bytes that are not UTF-8 follow `encoding_errors`:
"fail" (the default) raises; "replace" decodes them as U+FFFD; "skip" drops the line/record that holds them.
Either way the count lands in `ReadStats.invalid_utf8` and a warning names the file and the count.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import json
import lzma
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".xz")
ENCODING_POLICIES = ("fail", "replace", "skip")
TXT_UNITS = ("file", "paragraph", "line")
_SNIFF_BYTES = 8192
_STREAM_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


@dataclass
class ReadStats:
    """What `iter_documents` read, filled in as it streams."""

    files: int = 0
    documents: int = 0
    empty: int = 0  # blank documents skipped
    invalid_utf8: int = 0  # lines (txt/jsonl) or rows (csv) holding bytes that are not UTF-8


def file_format(path: Path) -> tuple[str, str | None]:
    """("txt" | "jsonl" | "csv" | "tsv" | "parquet", compression suffix or None) from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES else None
    suffix = suffixes[-1] if suffixes else ""
    if suffix in TEXT_SUFFIXES:
        return "txt", compression
    if suffix in RECORD_SUFFIXES:
        return ("jsonl" if suffix == ".ndjson" else suffix[1:]), compression
    supported = ", ".join(TEXT_SUFFIXES + RECORD_SUFFIXES)
    raise ValueError(
        f"{path}: unsupported file type {''.join(path.suffixes) or '(no suffix)'}; use one of {supported}, "
        f"optionally compressed ({', '.join(COMPRESSION_SUFFIXES)})"
    )


def _supported(path: Path) -> bool:
    try:
        file_format(path)
    except ValueError:
        return False
    return True


def resolve_files(path_or_glob: str | Path) -> list[Path]:
    """The files a path, folder or glob names, in sorted order."""
    text = str(path_or_glob)
    path = Path(text).expanduser()
    if path.is_file():
        file_format(path)  # raises for an unsupported type
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and _supported(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"{path} holds no {'/'.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
        return files
    if any(c in text for c in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = []
        for match in matches:
            files.extend(resolve_files(match) if match.is_dir() else [match] if _supported(match) else [])
        if not files:
            raise FileNotFoundError(f"no supported files match {text!r}")
        return files
    raise FileNotFoundError(f"{path} does not exist")


def _open_binary(path: Path, compression: str | None) -> BinaryIO:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _corrupt(path: Path, compression: str | None, error: Exception) -> ValueError:
    what = f"a valid {compression[1:]} stream" if compression else "readable"
    return ValueError(f"{path} is not {what} ({error}); re-create or re-download it")


def _check_start(path: Path, compression: str | None) -> None:
    """Text that decompresses to nothing, and binary files, fail here, before any document is yielded."""
    try:
        with _open_binary(path, compression) as stream:
            head = stream.read(_SNIFF_BYTES)
    except _STREAM_ERRORS as error:
        raise _corrupt(path, compression, error) from None
    if not head.strip():
        raise ValueError(f"{path} is empty (no text after decompression); remove it")
    if b"\x00" in head:
        raise ValueError(f"{path} looks binary (it holds NUL bytes), not UTF-8 text; check the file or its suffix")


def _lines(path: Path, compression: str | None, errors: str, stats: ReadStats) -> Iterator[tuple[int, str, bool]]:
    """(line number, decoded line, had invalid UTF-8) for each line, decoding per `errors`."""
    with _open_binary(path, compression) as stream:
        number = 0
        while True:
            try:
                raw = stream.readline()
            except _STREAM_ERRORS as error:
                raise _corrupt(path, compression, error) from None
            if not raw:
                return
            number += 1
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8"), False
            except UnicodeDecodeError as error:
                if errors == "fail":
                    bad = raw[error.start : error.start + 4]
                    raise ValueError(
                        f"{path}:{number}: invalid UTF-8 at byte {error.start} of the line ({bad!r}); convert the file "
                        f"to UTF-8 or choose encoding_errors='replace' or 'skip'"
                    ) from None
                stats.invalid_utf8 += 1
                yield number, raw.decode("utf-8", errors="replace"), True


def _txt_documents(path, compression, errors, unit, stats) -> Iterator[str]:
    lines = (text for _, text, bad in _lines(path, compression, errors, stats) if not (bad and errors == "skip"))
    if unit == "line":
        yield from (line.rstrip("\r\n") for line in lines)
    elif unit == "paragraph":
        paragraph: list[str] = []
        for line in lines:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")
    else:
        yield "".join(lines)


def _jsonl_documents(path, compression, errors, text_field, stats) -> Iterator[str]:
    for number, line, bad in _lines(path, compression, errors, stats):
        if (bad and errors == "skip") or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{path}:{number}: not valid JSON ({error.msg}); each line must be one JSON object"
            raise ValueError(message) from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise ValueError(f"{path}:{number}: a JSON {kind}, not an object with a {text_field!r} field")
        if text_field not in record:
            raise ValueError(
                f"{path}:{number}: no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                f"pass text_field=<the field that holds the text>"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: field {text_field!r} is a {type(value).__name__}, not a string")
        yield value


def _csv_documents(path, compression, errors, text_field, delimiter, stats) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # documents can exceed the module's 128 KiB default per field
    bad_lines: set[int] = set()

    def texts() -> Iterator[str]:
        for number, text, bad in _lines(path, compression, errors, stats):
            if bad:
                bad_lines.add(number)
            yield text

    reader = csv.reader(texts(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    if text_field not in header:
        raise ValueError(
            f"{path}:1: no column {text_field!r} in the header (columns: {', '.join(header)}); "
            f"pass text_field=<the column that holds the text>"
        )
    column = header.index(text_field)
    last_line = reader.line_num
    try:
        for row in reader:
            first_line, last_line = last_line + 1, reader.line_num
            if not row:
                continue
            if column >= len(row):
                raise ValueError(
                    f"{path}:{first_line}: row has {len(row)} fields, column {text_field!r} is field {column + 1}"
                )
            if errors == "skip" and bad_lines.intersection(range(first_line, last_line + 1)):
                continue
            yield row[column]
    except csv.Error as error:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None


def _parquet_documents(path: Path, compression: str | None, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if compression:
        raise ValueError(f"{path}: parquet compresses its own columns; pass the uncompressed .parquet file")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{path} is not a valid parquet file ({error})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); pass text_field=<column>")
    kind = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not strings")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (value or "" for value in batch.column(0).to_pylist())


def iter_documents(
    path_or_glob: str | Path,
    text_field: str = "text",
    *,
    encoding_errors: str = "fail",
    txt_unit: str = "file",
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Stream the documents of a file, folder or glob (see the module docstring). Pass a `ReadStats` to
    learn how many files, documents, blank documents and lines with invalid UTF-8 were seen."""
    if encoding_errors not in ENCODING_POLICIES:
        raise ValueError(f"encoding_errors={encoding_errors!r}; choose one of {', '.join(ENCODING_POLICIES)}")
    if txt_unit not in TXT_UNITS:
        raise ValueError(f"txt_unit={txt_unit!r}; choose one of {', '.join(TXT_UNITS)}")
    stats = stats if stats is not None else ReadStats()
    for path in resolve_files(path_or_glob):
        kind, compression = file_format(path)
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty; remove it or point at the files that hold the data")
        if kind == "parquet":
            documents = _parquet_documents(path, compression, text_field)
        else:
            _check_start(path, compression)
            if kind == "txt":
                documents = _txt_documents(path, compression, encoding_errors, txt_unit, stats)
            elif kind == "jsonl":
                documents = _jsonl_documents(path, compression, encoding_errors, text_field, stats)
            else:
                delimiter = "\t" if kind == "tsv" else ","
                documents = _csv_documents(path, compression, encoding_errors, text_field, delimiter, stats)
        stats.files += 1
        invalid_before = stats.invalid_utf8
        for document in documents:
            if document.strip():
                stats.documents += 1
                yield document
            else:
                stats.empty += 1
        if stats.invalid_utf8 > invalid_before:
            action = "dropped" if encoding_errors == "skip" else "decoded with U+FFFD"
            warnings.warn(
                f"{path}: {stats.invalid_utf8 - invalid_before} line(s) held invalid UTF-8 and were {action}",
                stacklevel=2,
            )
