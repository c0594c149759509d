"""Users' own files: every format and compression, folders and globs, and a clear error for each bad input."""

import bz2
import csv
import gzip
import json
import lzma
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.corpora.catalog import load_dataset
from lmforge.data.pipeline.files import ReadStats, iter_documents, resolve_files

DOCS = ['First document,\nwith a comma and "quotes".', "Zweites Dokument: ünïcödé ✓", "third\twith a tab"]
COMPRESSORS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
}


def encode(kind, docs, field="text"):
    if kind == "jsonl":
        return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    if kind in ("csv", "tsv"):
        path_rows = [["id", field]] + [[str(i), d] for i, d in enumerate(docs)]
        lines = []

        class Sink:
            def write(self, s):
                lines.append(s)

        csv.writer(Sink(), delimiter="\t" if kind == "tsv" else ",").writerows(path_rows)
        return "".join(lines).encode()
    raise AssertionError(kind)


@pytest.mark.parametrize("compression", list(COMPRESSORS))
@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_record_formats_round_trip_with_every_compression(tmp_path, kind, compression):
    path = tmp_path / f"data.{kind}{compression}"
    path.write_bytes(COMPRESSORS[compression](encode(kind, DOCS)))
    assert list(iter_documents(path)) == DOCS


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_text_files_by_file_paragraph_and_line(tmp_path, compression):
    text = "para one\nstill one\n\npara two\n\n\n"
    path = tmp_path / f"notes.txt{compression}"
    path.write_bytes(COMPRESSORS[compression](text.encode()))
    assert list(iter_documents(path)) == [text]
    assert list(iter_documents(path, txt_unit="paragraph")) == ["para one\nstill one", "para two"]
    stats = ReadStats()
    assert list(iter_documents(path, txt_unit="line", stats=stats)) == ["para one", "still one", "para two"]
    assert stats.empty == 3 and stats.documents == 3


def test_parquet_column_and_a_named_field(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": DOCS, "n": [1, 2, 3]}), path, row_group_size=2)
    assert list(iter_documents(path, text_field="body")) == DOCS
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text' \(columns: body, n\)"):
        list(iter_documents(path))
    with pytest.raises(ValueError, match="column 'n' holds int64, not strings"):
        list(iter_documents(path, text_field="n"))


def test_jsonl_named_field_and_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + encode("jsonl", DOCS, field="content"))
    assert list(iter_documents(path, text_field="content")) == DOCS


def test_folders_and_globs_read_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "A"}\n'))
    (tmp_path / "sub" / "c.txt").write_text("C")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert [p.name for p in resolve_files(tmp_path)] == ["a.jsonl.gz", "b.txt", "c.txt"]
    assert list(iter_documents(tmp_path)) == ["A", "B", "C"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["B"]
    assert list(iter_documents(str(tmp_path / "**" / "*.txt"))) == ["B", "C"]
    assert load_dataset(str(tmp_path / "**" / "*.txt"), split="train") == ["B", "C"]


def error_for(tmp_path, name, data, **options):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        list(iter_documents(path, **options))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_fail_with_a_one_line_message_naming_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="no supported files match"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    assert "empty.txt is empty" in error_for(tmp_path, "empty.txt", b"")
    assert "blank.jsonl.gz is empty (no text after decompression)" in error_for(
        tmp_path, "blank.jsonl.gz", gzip.compress(b"\n\n")
    )
    assert "looks binary" in error_for(tmp_path, "model.txt", b"\x00\x01\x02weights")
    assert "is not a valid gz stream" in error_for(tmp_path, "fake.txt.gz", b"not gzip at all")
    truncated = gzip.compress(b"x" * 100_000)[:40]
    assert "truncated.txt.gz is not a valid gz stream" in error_for(tmp_path, "truncated.txt.gz", truncated)
    assert "unsupported file type .docx" in error_for(tmp_path, "report.docx", b"PK")
    assert "d.jsonl:2: no field 'text' (fields: body)" in error_for(
        tmp_path, "d.jsonl", b'{"text": "ok"}\n{"body": "x"}\n'
    )
    assert "j.jsonl:3: not valid JSON" in error_for(tmp_path, "j.jsonl", b'{"text": "a"}\n\n{"text": \n')
    assert "l.jsonl:1: a JSON list" in error_for(tmp_path, "l.jsonl", b'["a"]\n')
    assert "n.jsonl:1: field 'text' is a int" in error_for(tmp_path, "n.jsonl", b'{"text": 3}\n')
    assert "c.csv:1: no column 'text' in the header (columns: id, body)" in error_for(
        tmp_path, "c.csv", b"id,body\n1,hello\n"
    )
    assert "s.csv:3: row has 1 fields" in error_for(tmp_path, "s.csv", b"id,text\n1,ok\n2\n")
    assert "pq.parquet is empty" in error_for(tmp_path, "pq.parquet", b"")
    assert "is not a valid parquet file" in error_for(tmp_path, "bad.parquet", b"PAR1 broken")


LATIN1 = "caf\xe9 au lait\n".encode("latin-1")


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv"])
def test_invalid_utf8_policies_fail_replace_or_skip_with_counts(tmp_path, kind):
    good = {"txt": b"good line\n", "jsonl": b'{"text": "good"}\n', "csv": b"good\n"}[kind]
    bad = {"txt": LATIN1, "jsonl": b'{"text": "caf\xe9"}\n', "csv": b"caf\xe9\n"}[kind]
    path = tmp_path / f"d.{kind}"
    path.write_bytes((b"text\n" if kind == "csv" else b"") + good + bad + good)
    line, byte = (3, 3) if kind == "csv" else (2, 13 if kind == "jsonl" else 3)
    with pytest.raises(ValueError, match=rf"d\.{kind}:{line}: invalid UTF-8 at byte {byte} .*encoding_errors="):
        list(iter_documents(path))
    for policy, expect_bad_kept in (("replace", True), ("skip", False)):
        stats = ReadStats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            docs = list(iter_documents(path, encoding_errors=policy, stats=stats, txt_unit="line"))
        assert stats.invalid_utf8 == 1
        assert any("1 line(s) held invalid UTF-8" in str(w.message) for w in caught)
        assert any("\ufffd" in d for d in docs) == expect_bad_kept
        assert len(docs) == (3 if expect_bad_kept else 2)


def test_unknown_name_that_is_not_a_path_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'shakespear': not in the catalog"):
        load_dataset("shakespear")
    with pytest.raises(ValueError, match="encoding_errors='ignore'; choose one of fail, replace, skip"):
        list(iter_documents(".", encoding_errors="ignore"))
