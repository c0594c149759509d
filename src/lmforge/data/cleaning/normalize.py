"""Text normalisation, the cleaning pipeline's first step: one canonical spelling for the same text.

Three passes, each idempotent, so that later steps (filters, hashes for deduplication) see equal text as
equal bytes:

1. **Unicode normalisation** (UAX #15). NFC (the default) composes `e` + U+0301 into `é` and changes
   nothing a reader can see. NFKC also folds compatibility forms (`ﬁ` -> `fi`, full-width `Ａ` -> `A`,
   `²` -> `2`, NBSP -> space): better for matching, lossy for typography.
2. **Control characters** (general category Cc, plus the byte-order mark U+FEFF) are removed, except tab
   and newline. Line breaks of every flavour (`\\r\\n`, `\\r`, U+0085, U+2028, U+2029, vertical tab, form
   feed) first become `\\n`, so they are kept as line breaks rather than deleted.
3. **Whitespace**: other Unicode spaces (NBSP, U+3000, ...) become a plain space; runs of spaces inside a
   line collapse to one (leading indentation is kept: it carries meaning in code and verse); trailing
   spaces and tabs go; more than `max_blank_lines` consecutive blank lines shrink to `max_blank_lines`;
   the document is stripped.
"""

from __future__ import annotations

import re
import unicodedata

_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# Cc = U+0000-U+001F and U+007F-U+009F; keep \t and \n. U+FEFF is a stray byte-order mark mid-text.
_CONTROL = {cp: None for cp in range(0xA0) if unicodedata.category(chr(cp)) == "Cc"}
del _CONTROL[ord("\t")], _CONTROL[ord("\n")]
_CONTROL[0xFEFF] = None
_OTHER_SPACES = re.compile(r"[^\S\t\n ]")  # whitespace that is not tab, newline or the plain space
_INNER_SPACE_RUNS = re.compile(r"(?<=\S) {2,}")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)

NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")


def normalize_unicode(text: str, form: str = "NFC") -> str:
    """`text` in Unicode normal form `form` ("none" leaves it unchanged)."""
    if form == "none":
        return text
    if form not in NORMAL_FORMS:
        raise ValueError(f"unicode form {form!r} is unknown; choose one of {', '.join(NORMAL_FORMS)}")
    return unicodedata.normalize(form, text)


def remove_control_characters(text: str) -> str:
    """Line breaks unified to `\\n`, then every Cc character except tab and newline (and U+FEFF) removed."""
    return _LINE_BREAKS.sub("\n", text).translate(_CONTROL)


def normalize_whitespace(text: str, max_blank_lines: int = 1) -> str:
    """Unicode spaces -> ' ', inner runs of spaces collapsed, trailing blanks cut, blank-line runs capped."""
    if max_blank_lines < 0:
        raise ValueError(f"max_blank_lines={max_blank_lines} must be >= 0")
    text = _OTHER_SPACES.sub(" ", text)
    text = _INNER_SPACE_RUNS.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = re.sub(f"\n{{{max_blank_lines + 2},}}", "\n" * (max_blank_lines + 1), text)
    return text.strip()


def normalize_text(text: str, form: str = "NFC", max_blank_lines: int = 1) -> str:
    """All three passes: Unicode form, control characters, whitespace."""
    return normalize_whitespace(remove_control_characters(normalize_unicode(text, form)), max_blank_lines)
