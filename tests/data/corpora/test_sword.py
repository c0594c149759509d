"""The SWORD zText reader: on a module written here byte by byte, against pysword (an independent reader) on
the real Debian modules, and the OSIS-to-text rules."""

import struct
import sys
import zlib

import pytest

from lmforge.data.corpora import sword
from lmforge.data.corpora.versification import VerseRef, kjv_books, kjv_slot_count, kjv_slots
from lmforge.fetch import extract, fetch_package


def write_ztext(folder, testament, entries, verses_per_block):
    """Write `entries` (one str per slot) as a zText testament: consecutive slots share a zlib block."""
    folder.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for start in range(0, len(entries), verses_per_block):
        block, number = bytearray(), len(bzs) // 12
        for text in entries[start : start + verses_per_block]:
            raw = text.encode()
            bzv += struct.pack("<IIH", number, len(block), len(raw))
            block += raw
        compressed = zlib.compress(bytes(block))
        bzs += struct.pack("<III", len(bzz), len(compressed), len(block))
        bzz += compressed
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{testament}.{ext}").write_bytes(bytes(data))


def tiny_kjv_module(folder):
    """A KJV-versified module whose only non-empty verses are Gen 1:1, Ps 119:176, John 3:16 and Rev 22:21."""
    texts = {
        VerseRef("Gen", 1, 1): "In the <w>beginning</w>.",
        VerseRef("Ps", 119, 176): "¶ I have gone astray<note>Heb. lost</note>.",
        VerseRef("John", 3, 16): '<q who="Jesus">For God so loved</q> the world.',
        VerseRef("Rev", 22, 21): "Amen &amp; amen.",
    }
    for testament in ("ot", "nt"):
        entries = [texts.get(ref, "") if ref else "" for ref in kjv_slots(testament)]
        write_ztext(folder, testament, entries, verses_per_block=5000)
    return texts


def test_reads_every_slot_of_a_module_written_here(tmp_path):
    entries = ["", "module heading", "ünïcode ¶", "", "x" * 300] + [f"verse {i}" for i in range(20)]
    write_ztext(tmp_path, "nt", entries, verses_per_block=3)
    assert sword.read_testament(tmp_path, "nt") == entries


def test_maps_slots_to_kjv_verses(tmp_path):
    texts = tiny_kjv_module(tmp_path)
    verses = sword.read_bible(tmp_path)
    assert len(verses) == 31_102
    assert {ref: text for ref, text in verses.items() if text} == texts
    assert sword.osis_to_text(verses[VerseRef("Ps", 119, 176)]) == "I have gone astray."
    assert sword.osis_to_text(verses[VerseRef("John", 3, 16)]) == "For God so loved the world."
    assert sword.osis_to_text(verses[VerseRef("Rev", 22, 21)]) == "Amen & amen."


def test_versification_has_the_standard_kjv_counts():
    books = dict(kjv_books())
    assert len(books) == 66 and sum(sum(c) for c in books.values()) == 31_102
    assert len(books["Gen"]) == 50 and books["Ps"][118] == 176 and books["3John"] == (14,)
    assert kjv_slot_count("ot") == 24_115 and kjv_slot_count("nt") == 8_246


def test_corrupt_or_foreign_modules_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ot\.bzs is missing"):
        sword.read_bible(tmp_path)
    write_ztext(tmp_path, "ot", ["a", "b", "c"], verses_per_block=2)
    write_ztext(tmp_path, "nt", ["a"], verses_per_block=1)
    with pytest.raises(ValueError, match="another versification"):
        sword.read_bible(tmp_path)
    data = bytearray((tmp_path / "ot.bzz").read_bytes())
    data[5] ^= 0xFF
    (tmp_path / "ot.bzz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not decompress|has .* bytes"):
        sword.read_testament(tmp_path, "ot")
    (tmp_path / "ot.bzv").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="partial record"):
        sword.read_testament(tmp_path, "ot")


def test_missing_module_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sword, "SWORD_ROOTS", (tmp_path,))
    monkeypatch.setattr(sword.os, "geteuid", lambda: 1000)  # not root: never tries apt itself
    with pytest.raises(FileNotFoundError, match=r"sudo apt-get update && apt-get install -y sword-text-kjv"):
        sword.find_module("engKJV2006eb", "sword-text-kjv")


def real_module(name, package):
    try:
        return sword.find_module(name, package)
    except (FileNotFoundError, RuntimeError) as error:
        pytest.skip(f"Debian package {package} cannot be installed here: {error}")


@pytest.fixture(scope="module")
def pysword_modules():
    """pysword 0.2.8 (an independent SWORD reader), fetched from PyPI and imported from its sdist."""
    try:
        archive = fetch_package("pysword", "0.2.8", "6302f350c22f39090e2556729551fac57a4c25ceb268f90cd7fd0584b9cca4f0")
    except RuntimeError as error:
        pytest.skip(f"pysword cannot be downloaded from the package index: {error}")
    sys.path.insert(0, str(extract(archive) / "pysword-0.2.8"))
    from pysword.modules import SwordModules

    modules = SwordModules(str(real_module("engKJV2006eb", "sword-text-kjv").parents[3]))
    modules.parse_modules()
    return modules


def compare_with_pysword(modules, books):
    osis_names = [name for name, _ in kjv_books()]
    for module, package in (("engKJV2006eb", "sword-text-kjv"), ("spaRV1909eb", "sword-text-sparv")):
        ours = sword.read_bible(real_module(module, package))
        bible = modules.get_bible_from_module(module)
        for book in books:
            theirs = list(bible.get_iter(books=[book.lower()], clean=False))
            assert theirs == [text for ref, text in ours.items() if ref.book == book], (module, book)
            assert book in osis_names


def test_raw_verses_match_pysword_on_a_few_books(pysword_modules):
    compare_with_pysword(pysword_modules, ["Ruth", "Jude", "Rev"])


@pytest.mark.slow
def test_raw_verses_match_pysword_on_every_book(pysword_modules):
    compare_with_pysword(pysword_modules, [name for name, _ in kjv_books()])
