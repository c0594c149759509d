"""A reader for SWORD zText Bible modules (the format of Debian's `sword-text-*` packages).

A zText module keeps each testament in three files (`ot.*` for the Old Testament, `nt.*` for the New):

    .bzs  block index:  per block, three little-endian uint32: offset in .bzz, compressed size, uncompressed size
    .bzv  verse index:  per slot, uint32 block number, uint32 offset inside the decompressed block, uint16 size
    .bzz  the blocks, each compressed on its own with zlib (CompressType=ZIP)

so slot i's text is `zlib.decompress(bzz[block.offset : block.offset + block.compressed])[offset : offset + size]`.
Slots follow the module's versification (see `versification.py`); both modules used here use the KJV one,
so slot i holds the same verse in each and verse pairs align by slot. Entries hold OSIS XML markup
(`<w lemma=...>`, `<note>`, `<title>`, paragraph marks `¶`), which `osis_to_text` turns into plain text.
Format reference: the SWORD project's zText driver (crosswire.org/sword, `zverse.cpp`).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from lmforge.data.corpora.versification import VerseRef, kjv_slot_count, kjv_slots

SWORD_ROOTS = (Path("/usr/share/sword/modules/texts/ztext"), Path.home() / ".sword" / "modules" / "texts" / "ztext")
BLOCK_ENTRY = struct.Struct("<III")  # offset, compressed size, uncompressed size
VERSE_ENTRY = struct.Struct("<IIH")  # block number, offset in block, size


def read_testament(folder: Path, testament: str) -> list[str]:
    """The raw OSIS text of every slot of one testament ("ot" or "nt") of the zText module in `folder`
    ("" for an empty slot). Raises FileNotFoundError for a missing file, ValueError for a corrupt one."""
    folder = Path(folder)
    paths = {ext: folder / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {folder} is not a complete SWORD zText module")
    block_index, verse_index, data = (paths[ext].read_bytes() for ext in ("bzs", "bzv", "bzz"))
    if len(block_index) % BLOCK_ENTRY.size or len(verse_index) % VERSE_ENTRY.size:
        raise ValueError(f"{paths['bzs']} or {paths['bzv']} has a partial record: the module is truncated")
    blocks = [BLOCK_ENTRY.unpack_from(block_index, i) for i in range(0, len(block_index), BLOCK_ENTRY.size)]
    decompressed: dict[int, bytes] = {}

    def block(number: int) -> bytes:
        if number not in decompressed:
            if number >= len(blocks):
                raise ValueError(f"{paths['bzv']} points at block {number}, but {paths['bzs']} has {len(blocks)}")
            offset, compressed, size = blocks[number]
            try:
                raw = zlib.decompress(data[offset : offset + compressed])
            except zlib.error as error:
                raise ValueError(f"block {number} of {paths['bzz']} does not decompress ({error})") from None
            if len(raw) != size:
                raise ValueError(f"block {number} of {paths['bzz']} has {len(raw)} bytes, its index says {size}")
            decompressed[number] = raw
        return decompressed[number]

    entries = []
    for i in range(0, len(verse_index), VERSE_ENTRY.size):
        number, offset, size = VERSE_ENTRY.unpack_from(verse_index, i)
        if size == 0:
            entries.append("")
            continue
        raw = block(number)
        if offset + size > len(raw):
            raise ValueError(f"slot {i // VERSE_ENTRY.size} of {paths['bzv']} runs past the end of block {number}")
        entries.append(raw[offset : offset + size].decode("utf-8", errors="replace"))
    return entries


def read_bible(folder: Path) -> dict[VerseRef, str]:
    """{verse: raw OSIS text} for every verse slot of a KJV-versified zText module (both testaments)."""
    verses = {}
    for testament in ("ot", "nt"):
        entries = read_testament(folder, testament)
        if len(entries) != kjv_slot_count(testament):
            raise ValueError(
                f"{folder}/{testament}.bzv has {len(entries)} slots, the KJV versification has "
                f"{kjv_slot_count(testament)}: this module uses another versification and does not align"
            )
        slots = zip(kjv_slots(testament), entries, strict=True)
        verses.update((ref, text) for ref, text in slots if ref is not None)
    return verses


_NOTE = re.compile(r"<note\b[^>]*>.*?</note>|<note\b[^>]*/>", re.S)
_TAG = re.compile(r"<[^>]*>")


def osis_to_text(markup: str) -> str:
    """Plain text of an OSIS fragment: footnotes dropped with their content, every other tag dropped
    keeping its content (words, psalm titles, added words), `¶` removed, entities decoded, spaces collapsed."""
    text = _TAG.sub("", _NOTE.sub("", markup))
    return " ".join(html.unescape(text).replace("¶", " ").split())


def find_module(module: str, package: str) -> Path:
    """Folder of the zText `module` (e.g. engKJV2006eb). When it is missing and we run as root with apt, it
    installs the Debian `package`; otherwise raises with the exact command to run."""
    for root in SWORD_ROOTS:
        if (root / module / "ot.bzv").is_file():
            return root / module
    command = f"apt-get update && apt-get install -y {package}"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            result = subprocess.run(step, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"could not install the Debian package {package} ({last}); run: {command}")
        if (SWORD_ROOTS[0] / module / "ot.bzv").is_file():
            return SWORD_ROOTS[0] / module
    raise FileNotFoundError(
        f"SWORD module {module} not found under {', '.join(map(str, SWORD_ROOTS))}; install it with: sudo {command}"
    )
