"""The cleaning pipeline: each step on crafted documents at its thresholds, streaming, atomic output, bad
input, the CLI as a user runs it, and a run over real text (tiny Shakespeare)."""

import bz2
import errno
import gzip
import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from lmforge.cli import main as lmforge_main
from lmforge.data.cleaning import clean, quality
from lmforge.data.cleaning.clean import CleanConfig, CleanReport, clean_file, clean_texts, stats_path
from lmforge.data.cleaning.clean_io import read_documents
from lmforge.data.cleaning.normalize import normalize_text

ALL_OFF = dict(
    min_words=0,
    min_mean_word_length=0,
    max_symbol_word_ratio=1e9,
    min_alpha_word_fraction=0,
    min_alpha_char_fraction=0,
    max_duplicate_line_fraction=1,
    max_duplicate_line_char_fraction=1,
    max_top_ngram_fractions=(),
    max_duplicate_ngram_fractions=(),
)


def only(step: str, **overrides) -> CleanConfig:
    return CleanConfig(steps=(step,), **{**ALL_OFF, **overrides})


def kept(texts: list[str], config: CleanConfig) -> list[str]:
    return list(clean_texts(texts, config))


def unique_words(n: int, start: int = 0) -> list[str]:
    """n distinct 4-letter words: qaaa, qaab, ..."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["q" + letters[i // 676 % 26] + letters[i // 26 % 26] + letters[i % 26] for i in range(start, start + n)]


# --- normalisation ----------------------------------------------------------------------------------


def test_unicode_forms():
    assert normalize_text("cafe\u0301") == "caf\u00e9"  # NFC composes
    assert normalize_text("\ufb01ne \uff21\u00b2") == "\ufb01ne \uff21\u00b2"  # NFC keeps compatibility forms
    assert normalize_text("\ufb01ne \uff21\u00b2", form="NFKC") == "fine A2"
    with pytest.raises(ValueError, match="unicode form 'NFX' is unknown"):
        normalize_text("x", form="NFX")


def test_control_characters_go_but_tabs_and_line_breaks_stay():
    assert normalize_text("a\x00b\x07c\x1b[0m\u0085d\x7f\x9fe") == "abc[0m\nde"
    assert normalize_text("\ufeffcol1\tcol2\r\nrow\rnext\u2028end") == "col1\tcol2\nrow\nnext\nend"


def test_whitespace_is_collapsed_and_blank_lines_capped():
    text = "  Title  \n\n\n\n\nThe   quick\u00a0\u00a0brown  fox.   \n    indented  line\t\n\n"
    assert normalize_text(text) == "Title\n\nThe quick brown fox.\n    indented line"
    assert normalize_text(text, max_blank_lines=0) == "Title\nThe quick brown fox.\n    indented line"


def test_normalisation_is_idempotent_on_messy_text():
    text = "x\u3000\u3000y \r\n\r\n\r\n z\x0c\tw  \u200a v" * 3
    once = normalize_text(text)
    assert normalize_text(once) == once and "  " not in once.replace("\n ", "")


# --- filters, each on documents just inside and just outside its threshold -------------------------


def test_length_in_words_and_characters():
    config = only("length", min_words=5, max_words=7)
    texts = [" ".join(unique_words(n)) for n in (4, 5, 7, 8)]
    assert kept(texts, config) == texts[1:3]
    config = only("length", min_chars=10, max_chars=12)
    assert kept(["a" * 9, "a" * 10, "a" * 12, "a" * 13], config) == ["a" * 10, "a" * 12]


def test_gopher_default_minimum_of_50_words():
    texts = [" ".join(unique_words(49)), " ".join(unique_words(50))]
    assert kept(texts, only("length", min_words=CleanConfig().min_words)) == texts[1:]


def test_mean_word_length_between_3_and_10():
    config = only("word_length", min_mean_word_length=3, max_mean_word_length=10)
    texts = ["abc abc", "ab abcd", "ab ab", "a" * 10, "a" * 11, "a" * 9 + " " + "a" * 12]
    assert kept(texts, config) == ["abc abc", "ab abcd", "a" * 10]


def test_symbol_to_word_ratio():
    config = only("symbols", max_symbol_word_ratio=0.1)
    words = unique_words(45)
    at_limit = " ".join(words + ["#"] * 5)  # 5 hashes / 50 words = 0.1
    over = " ".join(words[:44] + ["#"] * 6)  # 6 / 50 = 0.12
    ellipses_over = " ".join(words[:44] + ["wait..."] * 3 + ["and\u2026"] * 3)
    assert kept([at_limit, over, ellipses_over], config) == [at_limit]
    assert quality.symbol_to_word_ratio(ellipses_over, 50) == pytest.approx(0.12)


def test_alphabetic_word_fraction():
    config = only("alpha", min_alpha_word_fraction=0.8)
    inside = " ".join(unique_words(40) + ["1999"] * 10)  # 40/50 words hold a letter
    outside = " ".join(unique_words(39) + ["1999"] * 11)
    assert kept([inside, outside], config) == [inside]


def test_alphabetic_character_fraction():
    config = only("alpha", min_alpha_char_fraction=0.6)
    assert kept(["abc def 1234", "abcdef 12345 6"], config) == ["abc def 1234"]  # 6/10 vs 6/12 letters
    assert quality.alpha_char_fraction("ab 12 \u00e9\u00df") == pytest.approx(4 / 6)


def test_duplicate_line_fraction():
    config = only("repeated_lines", max_duplicate_line_fraction=0.3)
    lines = unique_words(7)
    inside = "\n".join(lines + lines[:3])  # 3 of 10 lines repeat an earlier one
    outside = "\n".join(lines[:6] + lines[:4])  # 4 of 10
    assert kept([inside, outside], config) == [inside]
    assert quality.duplicate_line_fractions(inside) == (0.3, 0.3)


def test_duplicate_line_character_fraction():
    config = only("repeated_lines", max_duplicate_line_char_fraction=0.2)
    inside = "\n".join(["x" * 40, "short", "y" * 35, "short"])  # 5 of 85 characters
    outside = "\n".join(["x" * 10, "a long repeated line", "a long repeated line"])  # 20 of 50
    assert kept([inside, outside], config) == [inside]


def test_top_ngram_character_fraction():
    # 100 four-letter words; the 2-gram "aaaa bbbb" repeated k times covers 8k of 400 characters.
    def doc(k: int) -> str:
        filler = iter(unique_words(100))
        words = []
        for _ in range(k):
            words += ["aaaa", "bbbb", next(filler)]
        words += [next(filler) for _ in range(100 - len(words))]
        return " ".join(words)

    config = only("top_ngrams", max_top_ngram_fractions=((2, 0.2),))
    assert quality.top_ngram_char_fraction(doc(10).split(), 2) == pytest.approx(0.2)
    assert kept([doc(10), doc(11)], config) == [doc(10)]
    assert quality.top_ngram_char_fraction(unique_words(3), 2) == 0.0  # nothing repeats


def test_duplicate_ngram_character_fraction():
    # A 5-gram occurring m times marks 5(m-1) of 100 four-letter words as duplicated.
    def doc(m: int) -> str:
        gram = ["g001", "g002", "g003", "g004", "g005"]
        words = []
        filler = iter(unique_words(100))
        for _ in range(m):
            words += gram + [next(filler)]
        words += [next(filler) for _ in range(100 - len(words))]
        return " ".join(words)

    config = only("duplicate_ngrams", max_duplicate_ngram_fractions=((5, 0.15),))
    assert quality.duplicate_ngram_char_fraction(doc(4).split(), 5) == pytest.approx(0.15)
    assert kept([doc(4), doc(5)], config) == [doc(4)]


def test_gopher_rules_keep_ordinary_prose_and_drop_boilerplate():
    prose = (
        "The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the "
        "library needs new shelves, and that the roof of the town hall must be repaired before winter. "
        "After a long debate about the cost of heating, they voted to postpone the decision until the "
        "next meeting, when the treasurer will present a detailed estimate from two local builders."
    )
    spam = "\n".join(["Buy now! Best prices on watches and bags, free shipping today only."] * 12)
    table = " ".join(f"{i} | {i * 7} | {i * 13}" for i in range(40))
    assert kept([prose, spam, table], CleanConfig(steps=("length", "alpha", "repeated_lines", "top_ngrams"))) == [prose]


# --- the pipeline as a whole -------------------------------------------------------------------------


def test_pipeline_counts_documents_and_characters_per_step():
    docs = [" ".join(unique_words(60, 100 * i)) + " mail me: a.b@example.com" for i in range(5)]
    docs = docs + [docs[0], "too short"]
    report = CleanReport()
    out = list(clean_texts(docs, CleanConfig(), report))
    assert len(out) == 5 and all("<EMAIL>" in t and "@" not in t for t in out)
    rows = {s.step: s for s in report.steps}
    assert [s.step for s in report.steps] == list(CleanConfig().steps)
    assert (rows["length"].docs_in, rows["length"].docs_out) == (7, 6)
    assert (rows["exact_dedup"].docs_in, rows["exact_dedup"].docs_out) == (6, 5)
    assert rows["pii"].chars_out == rows["pii"].chars_in - 5 * (len("a.b@example.com") - len("<EMAIL>"))
    assert report.pii == {"email": 5}


def test_pipeline_streams_lazily():
    consumed = 0

    def documents():
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield " ".join(unique_words(60, 60 * (i % 50)))  # 50 distinct documents, over and over

    stream = clean_texts(documents(), CleanConfig())
    first = [next(stream) for _ in range(3)]
    assert consumed == 3 and len(set(first)) == 3


def test_streaming_memory_stays_flat(tmp_path):
    # 2 MB of input through reading, normalising, filtering, exact dedup and PII scrubbing: the peak of
    # Python allocations stays far below the input size (only 16-byte digests are remembered).
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(1000):
            f.write(json.dumps({"id": i, "text": f"doc {i} " + " ".join(unique_words(400, i))}) + "\n")
    size = path.stat().st_size
    config = CleanConfig(steps=("normalize", "length", "exact_dedup", "pii"))
    tracemalloc.start()
    try:
        n = sum(1 for _ in clean_texts((d.text for d in read_documents(path)), config))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 1000 and size > 2e6
    assert peak < size / 8, f"peak {peak:,} bytes for a {size:,}-byte input"


# --- files: formats, atomic output, statistics -------------------------------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def long_doc(k: int) -> str:
    """A 60-word document sharing no word with long_doc(j) for j != k."""
    return " ".join(unique_words(60, 60 * k))


LONG = long_doc(0)


def test_jsonl_records_keep_their_other_fields(tmp_path):
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"id": i, "body": long_doc(i)}) + "\n" for i in range(3)))
    report = clean_file(src, tmp_path / "out.jsonl", CleanConfig(), text_field="body")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2] and records[2]["body"] == long_doc(2)
    stats = json.loads(stats_path(tmp_path / "out.jsonl").read_text())
    assert stats["documents_in"] == 3 and stats["documents_out"] == report.docs_out == 3
    assert [s["step"] for s in stats["steps"]] == list(CleanConfig().steps)


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".zst", zstandard.open)])
def test_compressed_input_and_output(tmp_path, suffix, opener):
    src = tmp_path / f"in.txt{suffix}"
    with opener(src, "wt") as f:
        f.write(f"{long_doc(0)}\n\n{long_doc(1)}\n\n\n{long_doc(0)}\n")
    out = tmp_path / f"out.txt{suffix}"
    clean_file(src, out)
    with opener(out, "rt") as f:
        assert f.read() == f"{long_doc(0)}\n\n{long_doc(1)}\n\n"


def test_text_layouts(tmp_path):
    src = write(tmp_path / "in.txt", "one doc\nsame doc\n\nsecond\n")
    config = CleanConfig(steps=("normalize",))
    clean_file(src, tmp_path / "blank.jsonl", config)
    assert [json.loads(x)["text"] for x in (tmp_path / "blank.jsonl").read_text().splitlines()] == [
        "one doc\nsame doc",
        "second",
    ]
    clean_file(src, tmp_path / "lines.txt", config, input_format="txt-lines")
    assert (tmp_path / "lines.txt").read_text() == "one doc\nsame doc\nsecond\n"


def test_text_output_refuses_documents_it_cannot_delimit(tmp_path):
    src = write(tmp_path / "in.jsonl", json.dumps({"text": "para one\n\npara two"}) + "\n")
    with pytest.raises(ValueError, match=r"in.jsonl:1: document holds a blank line.*write .jsonl output"):
        clean_file(src, tmp_path / "out.txt", CleanConfig(steps=("normalize",)))
    assert list(tmp_path.iterdir()) == [src]


def test_failure_mid_stream_leaves_no_output(tmp_path):
    lines = [json.dumps({"text": f"{LONG} {i}"}) for i in range(200)] + ["{not json", json.dumps({"text": "x"})]
    src = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"in.jsonl:201: malformed JSON"):
        clean_file(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no stats, no temp file
    write(out, "previous run\n")
    with pytest.raises(ValueError):
        clean_file(src, out)
    assert out.read_text() == "previous run\n"  # an earlier output is untouched


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty.txt is empty"),
        ("blank.txt", b"\n \n\n", r"blank.txt holds no documents"),
        ("blob.txt", b"abc\x00\x01\x02" * 100, r"blob.txt looks binary \(NUL bytes"),
        ("noise.txt", bytes(range(128, 256)) * 8, r"noise.txt looks binary \(over 10%"),
        ("wide.txt", "hello".encode("utf-16"), r"wide.txt is UTF-16 text"),
        ("bad.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object, got list"),
        (
            "bad.jsonl",
            b'{"text": "ok"}\n\n{"txt": "x", "id": 1}\n',
            r"bad.jsonl:3: no 'text' field \(keys: 'txt', 'id'\)",
        ),
        ("bad.jsonl", b'{"text": 5}\n', r"bad.jsonl:1: field 'text' is a int"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": "b",}\n', r"bad.jsonl:2: malformed JSON"),
        ("bad.txt.gz", b"plain text, not gzip", r"bad.txt.gz is not a readable .gz file"),
    ],
)
def test_bad_input_is_refused_with_a_one_line_error(tmp_path, name, content, message):
    src = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message) as error:
        clean_file(src, tmp_path / "out.jsonl", CleanConfig(steps=("normalize",)))
    assert "\n" not in str(error.value)
    assert sorted(tmp_path.iterdir()) == [src]


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        clean_file(tmp_path / "nope.txt", tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_invalid_utf8_policies(tmp_path):
    src = write(tmp_path / "in.txt", b"good one\n\nbad \xff byte\nsecond line\n\nfine \xc3\xa9\n")
    config = CleanConfig(steps=("normalize",))
    report = clean_file(src, tmp_path / "r.jsonl", config, on_invalid_utf8="replace")
    texts = [json.loads(x)["text"] for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert texts == ["good one", "bad \ufffd byte\nsecond line", "fine \u00e9"]
    assert (report.read.invalid_utf8_replaced, report.read.invalid_utf8_skipped) == (1, 0)
    report = clean_file(src, tmp_path / "s.jsonl", config, on_invalid_utf8="skip")
    assert (tmp_path / "s.jsonl").read_text().count("\n") == 2 and report.read.invalid_utf8_skipped == 1
    with pytest.raises(ValueError, match=r"in.txt:3: invalid UTF-8 at byte 5 of the line; use --on-invalid-utf8"):
        clean_file(src, tmp_path / "f.jsonl", config, on_invalid_utf8="fail")
    assert not (tmp_path / "f.jsonl").exists()


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    code = lmforge_main(["data", "clean", str(src), str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmforge data clean: error: ") and err.count("\n") == 1
    assert "in.jsonl:2: no 'text' field" in err and "--text-field" in err
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "o.jsonl"), "--skip", "normalise"]) == 2
    assert "unknown step(s) normalise" in capsys.readouterr().err
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "o.jsonl"), "--minhash-bands", "5"]) == 2
    assert "minhash_bands=5 must divide minhash_num_perm=128" in capsys.readouterr().err
    assert lmforge_main(["data", "clean", str(tmp_path / "missing.txt"), str(tmp_path / "o.jsonl")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_cli_keeping_nothing_is_an_error_naming_the_filter_with_nothing_written(tmp_path, capsys):
    src = write(tmp_path / "short.txt", "hello world.\n\nshort doc two.\n\nthird one here\n\nfour\n")
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.txt")]) == 2
    captured = capsys.readouterr()
    assert "│ length " in captured.out  # the table still shows where the documents went
    assert captured.err.count("\n") == 1 and captured.err.startswith("lmforge data clean: error: kept 0 of 4")
    assert "length" in captured.err and "--min-words 50" in captured.err and "nothing written" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # no output, no stats, no temp file
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.txt"), "--min-words", "1"]) == 0
    assert (tmp_path / "out.txt").read_text().count("\n\n") == 4


def test_cli_warns_when_one_filter_removes_most_documents(tmp_path, capsys):
    docs = [long_doc(1), "too short", "also too short", "short again"]
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.jsonl")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lmforge data clean: warning: kept 1 of 4") and err.count("\n") == 1
    assert "the length step removed 3" in err and "--min-words 50" in err
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.jsonl"), "--skip", "length"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_output_that_is_a_folder_is_a_one_line_error(tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", json.dumps({"text": LONG}) + "\n")
    (tmp_path / "out").mkdir()
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"] and not any((tmp_path / "out").iterdir())


def test_cli_disk_full_mid_clean_is_a_one_line_error_with_nothing_written(tmp_path, capsys, monkeypatch):
    class FillsUp:
        """A text stream that takes two writes, then fails as a full disk does."""

        def __init__(self, stream):
            self.stream, self.writes = stream, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, text: str) -> int:
            self.writes += 1
            if self.writes > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.stream.write(text)

    opener = clean.open_text_for_writing
    monkeypatch.setattr(clean, "open_text_for_writing", lambda path: FillsUp(opener(path)))
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"text": long_doc(i)}) + "\n" for i in range(5)))
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full (or not writable) while writing" in err and "out.jsonl" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_cli_invalid_utf8_replaced_is_a_warning_with_the_count(tmp_path, capsys):
    src = write(tmp_path / "in.txt", b"good one\n\nbad \xff byte\n\nworse \xfe\xfe\n")
    assert lmforge_main(["data", "clean", str(src), str(tmp_path / "out.txt"), "--steps", "normalize"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lmforge data clean: warning: invalid UTF-8 in 2 document(s) of")
    assert "U+FFFD" in err and "--on-invalid-utf8" in err and err.count("\n") == 1


# --- as a user runs it ---------------------------------------------------------------------------------


def test_cli_cleans_a_corpus_and_prints_the_table(tmp_path):
    docs = [LONG + " contact: jane@example.com", LONG + " contact: jane@example.com", "too short", long_doc(1)]
    src = write(tmp_path / "corpus.jsonl", "".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "clean.jsonl"
    command = [sys.executable, "-m", "lmforge", "data", "clean", str(src), str(out), "--skip", "near_dedup"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for step in ("read", "normalize", "length", "exact_dedup", "pii"):
        assert re.search(rf"│ {step} +│", result.stdout)
    assert "near_dedup" not in result.stdout and "PII replaced: email 1" in result.stdout
    assert "kept 2 of 4 documents" in result.stdout
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["n"] for r in records] == [0, 3] and records[0]["text"].endswith("contact: <EMAIL>")
    stats = json.loads(stats_path(out).read_text())
    assert stats["documents_out"] == 2 and stats["pii_replaced"] == {"email": 1}


# --- real text -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path) -> str:
    return shakespeare_path.read_text()


def test_shakespeare_with_default_rules(shakespeare, shakespeare_path, tmp_path):
    speeches = [s for s in re.split(r"\n\s*\n", shakespeare) if s.strip()]
    long_speeches = [s for s in speeches if len(s.split()) >= 50]
    report = clean_file(shakespeare_path, tmp_path / "out.jsonl")
    rows = {s.step: s for s in report.steps}
    assert report.read.documents == len(speeches) == 7222
    assert rows["length"].docs_out == len(long_speeches)
    # Verse passes Gopher's quality rules; only a handful of speeches repeat themselves too much
    # ("Ha, ha, ha!"-style refrains), and the play text holds no personal data.
    assert rows["alpha"].docs_out == rows["length"].docs_out
    assert len(long_speeches) - 10 <= report.docs_out < len(long_speeches)
    assert sum(report.pii.values()) == 0
    kept_texts = [json.loads(x)["text"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(len(t.split()) >= 50 for t in kept_texts) and len(kept_texts) == report.docs_out


def test_shakespeare_exact_duplicates(shakespeare, shakespeare_path, tmp_path):
    speeches = [s for s in re.split(r"\n\s*\n", shakespeare) if s.strip()]
    distinct = {"\n".join(line.rstrip() for line in s.strip().splitlines()) for s in speeches}
    config = CleanConfig(steps=("normalize", "exact_dedup", "pii"))
    report = clean_file(shakespeare_path, tmp_path / "out.txt", config)
    assert report.docs_out == len(distinct) and 0 < len(speeches) - len(distinct) < 100
    assert sum(report.pii.values()) == 0
    assert (tmp_path / "out.txt").read_text().count("\n\n") == len(distinct)
