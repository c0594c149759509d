"""Quality signals for heuristic document filters, after Gopher's MassiveWeb rules.

Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", Appendix
A.1.1 (quality filters) and Table A1 (repetition filters), keep a document only if it has

- 50 to 100,000 words, with a mean word length of 3 to 10 characters;
- a symbol-to-word ratio below 0.1 for the hash symbol and for the ellipsis;
- at least 80% of its words containing an alphabetic character;
- duplicate lines below 30% of lines and 20% of characters;
- a most frequent 2-, 3-, 4-gram covering at most 20%, 18%, 16% of the characters;
- duplicated 5- to 10-grams covering at most 15%, 14%, 13%, 12%, 11%, 10% of the characters.

Those are the pipeline's default thresholds (`lmforge.data.cleaning.clean.CleanConfig`). Each function here
measures one signal; the pipeline compares it with its threshold. Words are whitespace-separated tokens,
and "characters" in the n-gram rules are the characters of words (whitespace is not counted), as in the
paper.
"""

from __future__ import annotations

from collections import Counter


def symbol_to_word_ratio(text: str, n_words: int) -> float:
    """max(#'#', #ellipses) / words, ellipses counted as "..." and "…". Gopher drops a document above 0.1:
    hash-tag spam and truncated-snippet listings."""
    ellipses = text.count("...") + text.count("\u2026")
    return max(text.count("#"), ellipses) / max(n_words, 1)


def mean_word_length(words: list[str]) -> float:
    """Mean characters per word (0 for no words)."""
    return sum(map(len, words)) / len(words) if words else 0.0


def alpha_word_fraction(words: list[str]) -> float:
    """Fraction of words holding at least one alphabetic character (Gopher keeps >= 0.8)."""
    return sum(any(c.isalpha() for c in w) for w in words) / len(words) if words else 0.0


def alpha_char_fraction(text: str) -> float:
    """Alphabetic characters / non-whitespace characters. Prose is ~0.9 or more; tables of numbers,
    minified code and symbol art fall far below."""
    letters = sum(map(str.isalpha, text))
    visible = len(text) - sum(map(str.isspace, text))
    return letters / visible if visible else 0.0


def duplicate_line_fractions(text: str) -> tuple[float, float]:
    """(duplicate lines / lines, characters in duplicate lines / characters in lines) over non-blank lines.
    A line is a duplicate when the same (stripped) line appeared earlier in the document."""
    seen: set[str] = set()
    lines = dup_lines = chars = dup_chars = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return (dup_lines / lines, dup_chars / chars) if lines else (0.0, 0.0)


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the most frequent word n-gram times its count, over all word characters.

    Only a repeated n-gram counts (count >= 2): in a short document any single n-gram covers a large
    share, which says nothing about repetition."""
    total = sum(map(len, words))
    if total == 0 or len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = counts.most_common(1)[0]
    return count * sum(map(len, gram)) / total if count >= 2 else 0.0


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by repeated occurrences of word n-grams, over all word characters.

    Scanning left to right, an n-gram already seen earlier marks its n words as duplicated; each word is
    counted once even when several duplicate n-grams overlap it, so the fraction stays in [0, 1]."""
    total = sum(map(len, words))
    if total == 0 or len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i, gram in enumerate(zip(*(words[j:] for j in range(n)), strict=False)):
        if gram in seen:
            covered[i : i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, hit in zip(words, covered, strict=False) if hit) / total
