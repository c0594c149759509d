"""`data prepare`: token files equal to encoding each document directly, EOS after every document, the right
dtype, a truthful meta.json, the same bytes for any worker count, resumption after a real kill -9 or a full
disk, bad input refused with nothing written, and earlier shards replaced only with --overwrite, in one swap."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmforge.cli import main
from lmforge.data.pipeline import shards
from lmforge.data.pipeline.shards import open_split, prepare, read_meta
from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer

QUIET = {"log": lambda *a: None}


def shakespeare_documents(path: Path) -> list[str]:
    """The first 300 kB of tiny Shakespeare cut into 40 documents at blank lines (speech boundaries)."""
    speeches = path.read_text()[:300_000].split("\n\n")
    step = -(-len(speeches) // 40)
    return ["\n\n".join(speeches[i : i + step]) for i in range(0, len(speeches), step)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_path) -> tuple[list[Path], list[str]]:
    """The documents as two .jsonl files and one .txt file (one document): (files, documents in order)."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = shakespeare_documents(shakespeare_path)
    files = [folder / "a.jsonl", folder / "b.jsonl", folder / "c.txt"]
    files[0].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]))
    files[1].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[20:39])))
    files[2].write_text(docs[39])
    return files, docs


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, shakespeare_path) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    tok = train_tokenizer([shakespeare_path.read_text()[:300_000]], kind="bpe", vocab_size=2000)
    save_tokenizer(tok, folder, "bpe", ["<|endoftext|>"])
    return folder


@pytest.fixture(scope="module")
def char(tmp_path_factory, shakespeare_path) -> Path:
    folder = tmp_path_factory.mktemp("char")
    save_tokenizer(
        train_tokenizer([shakespeare_path.read_text()], kind="char"), folder, "char", ["<|endoftext|>", "<unk>"]
    )
    return folder


def tokens_of(folder: Path, split: str) -> np.ndarray:
    return np.concatenate(open_split(folder, split)) if read_meta(folder)["splits"][split]["files"] else np.zeros(0)


def test_tokens_equal_direct_encoding_with_eos_after_each_document(corpus, bpe, tmp_path):
    files, docs = corpus
    meta = prepare([str(f) for f in files], str(bpe), tmp_path / "out", val_fraction=0.1, seed=3, workers=2, **QUIET)
    tok = Tokenizer.from_file(str(bpe / "tokenizer.json"))
    encoded = [tok.encode(d, add_special_tokens=False).ids + [0] for d in docs]  # <|endoftext|> is id 0
    val_docs = meta["splits"]["validation"]["documents"]
    assert val_docs == 4 and meta["splits"]["train"]["documents"] == 36 and meta["documents"] == 40
    train, val = tokens_of(tmp_path / "out", "train"), tokens_of(tmp_path / "out", "validation")
    assert len(train) + len(val) == meta["tokens"] == sum(map(len, encoded))
    # the val documents are whole documents, in corpus order; train is everything else, in order
    chosen = np.random.default_rng(3).choice(40, size=4, replace=False)
    assert val.tolist() == [t for i in sorted(chosen) for t in encoded[i]]
    assert train.tolist() == [t for i in range(40) if i not in chosen for t in encoded[i]]
    eos_positions = np.flatnonzero(train == 0)
    assert np.array_equal(eos_positions + 1, np.cumsum([len(encoded[i]) for i in range(40) if i not in chosen]))


def test_meta_json_describes_the_output(corpus, bpe, tmp_path):
    files, _ = corpus
    meta = prepare([str(f) for f in files], str(bpe), tmp_path, workers=1, **QUIET)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta
    assert meta["tokenizer_sha256"] == hashlib.sha256((bpe / "tokenizer.json").read_bytes()).hexdigest()
    assert (meta["vocab_size"], meta["dtype"], meta["eos_token_id"]) == (2000, "uint16", 0)
    assert [s["bytes"] for s in meta["sources"]] == [f.stat().st_size for f in files]
    for name in ("train", "validation"):
        split = meta["splits"][name]
        assert sum((tmp_path / f).stat().st_size for f in split["files"]) == 2 * split["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "validation.bin"]


def test_output_is_identical_for_any_worker_count(corpus, char, tmp_path):
    files, _ = corpus
    for workers in (1, 2, 3):
        prepare(
            [str(f) for f in files], str(char), tmp_path / str(workers), workers=workers, chunk_chars=20_000, **QUIET
        )
    for name in ("train.bin", "validation.bin"):
        blobs = {(tmp_path / str(w) / name).read_bytes() for w in (1, 2, 3)}
        assert len(blobs) == 1


def test_too_few_documents_are_split_by_tokens(char, tmp_path, shakespeare_path):
    meta = prepare([str(shakespeare_path)], str(char), tmp_path, val_fraction=0.1, **QUIET)
    text = shakespeare_path.read_text()
    assert meta["split_by"] == "tokens" and meta["tokens"] == len(text) + 1
    assert meta["splits"]["validation"]["tokens"] == round(0.1 * (len(text) + 1))
    tok = Tokenizer.from_file(str(char / "tokenizer.json"))
    stream = np.concatenate([tokens_of(tmp_path, "train"), tokens_of(tmp_path, "validation")])
    assert tok.decode(stream.tolist()) == text  # the EOS at the end is a special token, skipped


def test_shards_are_bounded_and_concatenate_to_the_single_file(corpus, char, tmp_path):
    files, _ = corpus
    single = prepare([str(f) for f in files], str(char), tmp_path / "one", workers=1, **QUIET)
    sharded = prepare(
        [str(f) for f in files], str(char), tmp_path / "many", workers=1, max_shard_tokens=100_000, **QUIET
    )
    names = sharded["splits"]["train"]["files"]
    assert names[0] == "train-00000.bin" and len(names) == -(-single["splits"]["train"]["tokens"] // 100_000)
    assert all((tmp_path / "many" / n).stat().st_size <= 200_000 for n in names)
    assert np.array_equal(tokens_of(tmp_path / "many", "train"), tokens_of(tmp_path / "one", "train"))


def test_large_vocabularies_use_uint32(tmp_path):
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("w5 w69999 w65536")
    meta = prepare([str(tmp_path / "doc.txt")], str(tmp_path / "tok"), tmp_path / "out", val_fraction=0, **QUIET)
    assert meta["dtype"] == "uint32"
    assert tokens_of(tmp_path / "out", "train").tolist() == [6, 70_000, 65_537, 0]


def test_gpt2_tiny_shakespeare_has_the_known_token_count(tmp_path, shakespeare_path):
    try:
        meta = prepare([str(shakespeare_path)], "gpt2", tmp_path, **QUIET)
    except RuntimeError as error:  # only when the package index is out of reach
        pytest.skip(f"GPT-2 BPE could not be downloaded: {error}")
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16" and meta["eos_token_id"] == 50256
    assert meta["tokens"] == 338_025 + 1  # nanoGPT's shakespeare prepare.py: 301,966 + 36,059 tokens


def test_rerun_with_the_same_settings_is_a_no_op(corpus, char, tmp_path):
    files, _ = corpus
    prepare([str(f) for f in files], str(char), tmp_path, **QUIET)
    before = (tmp_path / "train.bin").stat().st_mtime_ns
    messages = []
    prepare([str(f) for f in files], str(char), tmp_path, log=messages.append)
    assert messages == [f"{tmp_path} is up to date"] and (tmp_path / "train.bin").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="val_fraction.*--overwrite"):  # new settings: refused, then redone
        prepare([str(f) for f in files], str(char), tmp_path, val_fraction=0.2, **QUIET)
    prepare([str(f) for f in files], str(char), tmp_path, val_fraction=0.2, overwrite=True, **QUIET)
    assert read_meta(tmp_path)["splits"]["validation"]["documents"] == 8


def test_resume_after_kill_9_gives_the_bytes_of_an_uninterrupted_run(char, tmp_path, capsys, shakespeare_path):
    speeches = shakespeare_path.read_text()[:600_000].split("\n\n")  # one document per speech: ~300 chunks
    inputs = [tmp_path / "speeches.jsonl"]
    inputs[0].write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    args = [
        "--tokenizer",
        str(char),
        "--workers",
        "2",
        "--chunk-chars",
        "2000",
        "--no-progress",
        "--val-fraction",
        "0.1",
    ]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lmforge", "data", "prepare", *map(str, inputs), "--out", str(out), *args]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".prepare" / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 10:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # the CLI and its worker processes
    process.wait()
    assert not any((out / name).exists() for name in ("meta.json", "train.bin", "validation.bin"))
    done_before = journal.read_text().count("\n")
    assert done_before >= 10

    assert main(["data", "prepare", *map(str, inputs), "--out", str(out), *args]) == 0  # the rerun
    assert "resuming:" in capsys.readouterr().out
    assert not (out / ".prepare").exists()

    reference = tmp_path / "reference"
    assert main(["data", "prepare", *map(str, inputs), "--out", str(reference), *args]) == 0
    for name in ("train.bin", "validation.bin"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    meta, expected = read_meta(out), read_meta(reference)
    assert meta["splits"] == expected["splits"] and meta["documents"] == len(speeches)


def test_bad_input_is_refused_with_nothing_written(char, tmp_path, capsys, shakespeare_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 1000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"hear me speak\n" * 10_000 + "café\n".encode("latin-1"))  # bad byte past the first 64 kB
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    wide = tmp_path / "wide.txt"
    wide.write_bytes("hear me speak\n".encode("utf-16"))  # NUL bytes, but not binary: say what it is
    cases = [
        (empty, "is empty"),
        (tmp_path / "missing.txt", "does not exist"),
        (binary, "looks binary"),
        (wide, "wide.txt is UTF-16 text; convert it to UTF-8"),
        (latin1, "not valid UTF-8"),
        (bad_json, "no field 'text'"),
    ]
    for path, message in cases:
        assert main(["data", "prepare", str(path), "--tokenizer", str(char), "--out", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists(), path
    assert main(["data", "prepare", str(shakespeare_path), "--tokenizer", str(tmp_path), "--out", str(out)]) == 2
    assert "tokenizer" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="val-fraction"):
        prepare([str(shakespeare_path)], str(char), out, val_fraction=1.0)


def test_old_shards_that_name_the_held_out_split_val_still_read(corpus, char, tmp_path):
    files, _ = corpus
    prepare([str(f) for f in files], str(char), tmp_path, workers=1, **QUIET)
    expected = tokens_of(tmp_path, "validation")
    meta = read_meta(tmp_path)
    meta["splits"]["val"] = meta["splits"].pop("validation")  # as data prepare wrote it before
    meta["splits"]["val"]["files"] = ["val.bin"]
    (tmp_path / "validation.bin").rename(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert np.array_equal(np.concatenate(open_split(tmp_path, "validation")), expected)


def test_output_from_other_inputs_is_kept_unless_overwrite_then_replaced_whole(corpus, char, tmp_path, capsys):
    files, _ = corpus
    out = tmp_path / "shards"
    common = ["--tokenizer", str(char), "--out", str(out), "--no-progress", "--workers", "1"]
    assert main(["data", "prepare", str(files[0]), *common]) == 0
    first = read_meta(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["data", "prepare", str(files[1]), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err and "sources" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier shards are untouched

    assert main(["data", "prepare", str(files[1]), *common, "--max-shard-tokens", "50000", "--overwrite"]) == 0
    second = read_meta(out)
    assert second["documents"] == 19 != first["documents"]
    names = {f for split in second["splits"].values() for f in split["files"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"meta.json"})  # no train.bin of the old run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary or old folder beside it

    (out / "notes.txt").write_text("mine")  # a folder that holds more than shards is never swapped away
    assert main(["data", "prepare", str(files[0]), *common, "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and read_meta(out) == second


def test_out_that_is_a_file_is_a_one_line_error(corpus, char, tmp_path, capsys):
    files, _ = corpus
    taken = tmp_path / "shards"
    taken.write_text("not a folder")
    assert main(["data", "prepare", str(files[2]), "--tokenizer", str(char), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shards is a file" in err and taken.read_text() == "not a folder"


def test_disk_full_mid_prepare_is_a_one_line_error_and_a_rerun_resumes(corpus, char, tmp_path, capsys, monkeypatch):
    files, _ = corpus
    real_atomic_open = shards.atomic_open
    calls = {"n": 0}

    @contextmanager
    def fills_up(path, mode="w", **kwargs):
        """Three chunks (a .len and a .bin file each) fit, then the disk is full."""
        calls["n"] += 1
        with real_atomic_open(path, mode, **kwargs) as stream:
            if calls["n"] > 6:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield stream

    monkeypatch.setattr(shards, "atomic_open", fills_up)
    out = tmp_path / "shards"
    args = ["data", "prepare", *map(str, files), "--tokenizer", str(char), "--out", str(out), "--no-progress"]
    args += ["--workers", "1", "--chunk-chars", "20000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full (or not writable) while writing" in err and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == [".prepare"]  # finished chunks only: nothing half-written
    assert not any(".tmp-" in p.name for p in (out / ".prepare").iterdir())
    monkeypatch.setattr(shards, "atomic_open", real_atomic_open)
    assert main(args) == 0
    assert "resuming: 3 chunks already done" in capsys.readouterr().out
    reference = tmp_path / "reference"
    prepare([str(f) for f in files], str(char), reference, workers=1, chunk_chars=20_000, **QUIET)
    for name in ("train.bin", "validation.bin"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
