"""The cleaning pipeline: normalise, filter, deduplicate and scrub a stream of documents.

Documents flow through a chain of steps, one at a time (generators all the way), so a corpus larger than
memory is fine: only the deduplication steps remember anything, and what they keep is a digest or a
MinHash signature per kept document, never the text. Each step maps a text to a text, or to None to drop
the document; a `StepStats` row per step counts documents and characters in and out.

Steps, in pipeline order (`CleanConfig.steps` selects a subset; the order stays this one):

| step               | does                                                                                 |
|--------------------|--------------------------------------------------------------------------------------|
| `normalize`        | Unicode form, control characters, whitespace (`lmforge.data.cleaning.normalize`)     |
| `length`           | characters in [min_chars, max_chars], words in [min_words, max_words]                |
| `word_length`      | mean word length in [min_mean_word_length, max_mean_word_length]                     |
| `symbols`          | '#' and ellipses per word <= max_symbol_word_ratio                                   |
| `alpha`            | words holding a letter >= min_alpha_word_fraction; letters / visible chars           |
|                    | >= min_alpha_char_fraction                                                           |
| `repeated_lines`   | duplicate lines (count and characters) under their maxima                            |
| `top_ngrams`       | most frequent 2/3/4-gram's share of characters under its maximum                     |
| `duplicate_ngrams` | characters in repeated 5..10-grams under their maxima                                |
| `exact_dedup`      | drops a text seen before (BLAKE2b digest)                                            |
| `near_dedup`       | drops a near-duplicate of a kept text (MinHash + LSH, `lmforge.data.cleaning.dedup`) |
| `pii`              | e-mails, phones, IPs, card numbers -> placeholders (`lmforge.data.cleaning.pii`)     |

Filter defaults are Gopher's (Rae et al. 2021, App. A.1.1 and Table A1; see `lmforge.data.cleaning.quality`),
except `min_alpha_char_fraction` (0.6, ours: English prose sits near 0.95 and Shakespeare's speeches
above 0.8, while tables of numbers and symbol art fall below 0.5) and the character limits (off).
Filters run before deduplication so that the expensive MinHash only sees documents worth keeping, and
PII scrubbing runs last so that deduplication sees the original text.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from lmforge.data.cleaning import quality
from lmforge.data.cleaning.clean_io import (
    ReadStats,
    open_text_for_writing,
    read_documents,
    resolve_input_format,
    resolve_output_format,
)
from lmforge.data.cleaning.dedup import ExactDeduplicator, NearDeduplicator, lsh_threshold
from lmforge.data.cleaning.normalize import NORMAL_FORMS, normalize_text
from lmforge.data.cleaning.pii import scrub_pii
from lmforge.io import atomic_path, write_errors_explained, write_json_atomic

STEP_NAMES = (
    "normalize",
    "length",
    "word_length",
    "symbols",
    "alpha",
    "repeated_lines",
    "top_ngrams",
    "duplicate_ngrams",
    "exact_dedup",
    "near_dedup",
    "pii",
)
# The CleanConfig fields that loosen each filtering step, named in the warning and error of a run that keeps little.
RELAXED_BY: dict[str, tuple[str, ...]] = {
    "length": ("min_words", "min_chars", "max_words", "max_chars"),
    "word_length": ("min_mean_word_length", "max_mean_word_length"),
    "symbols": ("max_symbol_word_ratio",),
    "alpha": ("min_alpha_word_fraction", "min_alpha_char_fraction"),
    "repeated_lines": ("max_duplicate_line_fraction", "max_duplicate_line_char_fraction"),
    "top_ngrams": ("max_top_ngram_fractions",),
    "duplicate_ngrams": ("max_duplicate_ngram_fractions",),
    "near_dedup": ("near_dup_threshold",),
}
T = TypeVar("T")


def parse_steps(value: str) -> tuple[str, ...]:
    """ "normalize,exact_dedup" -> ("normalize", "exact_dedup"), each checked against STEP_NAMES."""
    steps = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEP_NAMES)}")
    return steps


def parse_ngram_fractions(value: str) -> tuple[tuple[int, float], ...]:
    """ "2:0.2,3:0.18" -> ((2, 0.2), (3, 0.18)): n-gram size and the maximum fraction of characters."""
    try:
        pairs = [item.split(":") for item in value.split(",") if item.strip()]
        return tuple((int(n), float(fraction)) for n, fraction in pairs)
    except ValueError:
        raise ValueError(f"n-gram thresholds {value!r} must look like 2:0.20,3:0.18 (n:max_fraction)") from None


def _opt(default, help: str, **metadata):
    """A config field with its help text (the CLI is generated from these)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class CleanConfig:
    """Everything the pipeline does, with Gopher's thresholds as defaults (see the module docstring)."""

    steps: tuple[str, ...] = _opt(STEP_NAMES, "steps to run, comma-separated", parse=parse_steps)
    unicode_form: str = _opt("NFC", "Unicode normal form (NFKC also folds compatibility forms)", choices=NORMAL_FORMS)
    max_blank_lines: int = _opt(1, "longest run of blank lines kept inside a document")
    min_chars: int = _opt(0, "minimum characters")
    max_chars: int | None = _opt(None, "maximum characters", parse=int)
    min_words: int = _opt(50, "minimum words")
    max_words: int = _opt(100_000, "maximum words")
    min_mean_word_length: float = _opt(3.0, "minimum mean word length")
    max_mean_word_length: float = _opt(10.0, "maximum mean word length")
    max_symbol_word_ratio: float = _opt(0.1, "maximum '#' or ellipses per word")
    min_alpha_word_fraction: float = _opt(0.8, "minimum fraction of words with a letter")
    min_alpha_char_fraction: float = _opt(0.6, "minimum letters / non-whitespace characters")
    max_duplicate_line_fraction: float = _opt(0.3, "maximum fraction of duplicate lines")
    max_duplicate_line_char_fraction: float = _opt(0.2, "maximum characters in duplicate lines")
    max_top_ngram_fractions: tuple[tuple[int, float], ...] = _opt(
        ((2, 0.20), (3, 0.18), (4, 0.16)),
        "n:max pairs: most frequent n-gram's share of word characters",
        parse=parse_ngram_fractions,
    )
    max_duplicate_ngram_fractions: tuple[tuple[int, float], ...] = _opt(
        ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
        "n:max pairs: share of word characters in repeated n-grams",
        parse=parse_ngram_fractions,
    )
    near_dup_threshold: float = _opt(0.8, "Jaccard similarity at or above which a document is a near-duplicate")
    minhash_num_perm: int = _opt(128, "MinHash hash functions k")
    minhash_bands: int = _opt(32, "LSH bands b (rows r = k / b; S-curve threshold ~ (1/b)^(1/r))")
    shingle: str = _opt("word", "near-dedup shingles: word or char n-grams", choices=("word", "char"))
    shingle_size: int = _opt(5, "words (or characters) per shingle")
    seed: int = _opt(0, "seed of the MinHash hash functions")

    def __post_init__(self) -> None:
        parse_steps(",".join(self.steps))
        if self.unicode_form not in NORMAL_FORMS:
            raise ValueError(f"unicode_form={self.unicode_form!r} is unknown; choose one of {', '.join(NORMAL_FORMS)}")
        if self.shingle not in ("word", "char"):
            raise ValueError(f"shingle={self.shingle!r} is unknown; choose word or char")
        if self.minhash_bands < 1 or self.minhash_num_perm % self.minhash_bands:
            raise ValueError(f"minhash_bands={self.minhash_bands} must divide minhash_num_perm={self.minhash_num_perm}")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars={self.max_chars} is below min_chars={self.min_chars}")
        if self.max_words < self.min_words:
            raise ValueError(f"max_words={self.max_words} is below min_words={self.min_words}")


@dataclass
class StepStats:
    """Documents and characters going into and coming out of one step."""

    step: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0


@dataclass
class CleanReport:
    """Per-step counts of one run, plus what reading saw and how much PII was replaced, by kind."""

    read: ReadStats = field(default_factory=ReadStats)
    steps: list[StepStats] = field(default_factory=list)
    pii: Counter = field(default_factory=Counter)

    @property
    def docs_out(self) -> int:
        return self.steps[-1].docs_out if self.steps else self.read.documents

    def to_dict(self) -> dict:
        return {
            "read": asdict(self.read),
            "steps": [asdict(s) for s in self.steps],
            "documents_in": self.read.documents,
            "documents_out": self.docs_out,
            "pii_replaced": dict(sorted(self.pii.items())),
        }

    def table(self, title: str = "lmforge data clean"):
        """A rich Table: one row per step with documents and characters in and out."""
        from rich.table import Table

        table = Table(title=title)
        for column in ("step", "docs in", "docs out", "removed", "chars in", "chars out"):
            table.add_column(column, justify="left" if column == "step" else "right")
        rows = [StepStats("read", self.read.documents, self.read.documents, self.read.chars, self.read.chars)]
        for s in rows + self.steps:
            table.add_row(
                s.step,
                f"{s.docs_in:,}",
                f"{s.docs_out:,}",
                f"{s.docs_in - s.docs_out:,}",
                f"{s.chars_in:,}",
                f"{s.chars_out:,}",
            )
        return table


class NothingKeptError(ValueError):
    """No document survived the pipeline. Carries the run's report, so a caller can show where they went."""

    def __init__(self, message: str, report: CleanReport) -> None:
        super().__init__(message)
        self.report = report


def _setting(value) -> str:
    """A config value as typed on the command line: ((2, 0.2), (3, 0.18)) -> "2:0.2,3:0.18"."""
    return ",".join(f"{n}:{x}" for n, x in value) if isinstance(value, tuple) else str(value)


def _can_loosen(name: str, value) -> bool:
    """False for a limit already off: no maximum (None), no n-gram rule (()), or a minimum of 0."""
    return value not in (None, ()) and not (name.startswith("min_") and value == 0)


def explain_removals(report: CleanReport, config: CleanConfig) -> str:
    """The step that removed the most documents and how to loosen it, e.g. "the length step removed 4 of 4
    (relax --min-words 50, --max-words 100000, or --skip length)"; for a run that kept little."""
    worst = max(report.steps, key=lambda s: s.docs_in - s.docs_out, default=None)
    if worst is None or worst.docs_in == worst.docs_out:
        if report.read.invalid_utf8_skipped:
            return (
                f"{report.read.invalid_utf8_skipped:,} document(s) held invalid UTF-8 and were skipped "
                "(--on-invalid-utf8 replace keeps them)"
            )
        return "no step removed a document"
    fields = [f for f in RELAXED_BY.get(worst.step, ()) if _can_loosen(f, getattr(config, f))]
    flags = "".join(f"--{f.replace('_', '-')} {_setting(getattr(config, f))}, " for f in fields)
    how = f"relax {flags}or --skip {worst.step}" if flags else f"--skip {worst.step} keeps them"
    return f"the {worst.step} step removed {worst.docs_in - worst.docs_out:,} of {worst.docs_in:,} ({how})"


def _length_step(c: CleanConfig) -> Callable[[str], str | None]:
    max_chars = c.max_chars if c.max_chars is not None else float("inf")

    def step(text: str) -> str | None:
        n_words = len(text.split())
        ok = c.min_chars <= len(text) <= max_chars and c.min_words <= n_words <= c.max_words
        return text if ok else None

    return step


def _word_length_step(c: CleanConfig) -> Callable[[str], str | None]:
    def step(text: str) -> str | None:
        return (
            text if c.min_mean_word_length <= quality.mean_word_length(text.split()) <= c.max_mean_word_length else None
        )

    return step


def _symbols_step(c: CleanConfig) -> Callable[[str], str | None]:
    def step(text: str) -> str | None:
        return text if quality.symbol_to_word_ratio(text, len(text.split())) <= c.max_symbol_word_ratio else None

    return step


def _alpha_step(c: CleanConfig) -> Callable[[str], str | None]:
    def step(text: str) -> str | None:
        ok = quality.alpha_word_fraction(text.split()) >= c.min_alpha_word_fraction
        return text if ok and quality.alpha_char_fraction(text) >= c.min_alpha_char_fraction else None

    return step


def _repeated_lines_step(c: CleanConfig) -> Callable[[str], str | None]:
    def step(text: str) -> str | None:
        lines, chars = quality.duplicate_line_fractions(text)
        ok = lines <= c.max_duplicate_line_fraction and chars <= c.max_duplicate_line_char_fraction
        return text if ok else None

    return step


def _ngram_step(measure: Callable[[list[str], int], float], limits: tuple[tuple[int, float], ...]):
    def step(text: str) -> str | None:
        words = text.split()
        return text if all(measure(words, n) <= limit for n, limit in limits) else None

    return step


def build_steps(
    config: CleanConfig, pii_counts: Counter | None = None
) -> list[tuple[str, Callable[[str], str | None]]]:
    """(name, step) pairs for the configured steps, in pipeline order; dedup steps carry fresh state."""
    c = config

    def normalize(text: str) -> str:
        return normalize_text(text, c.unicode_form, c.max_blank_lines)

    def dropping(is_duplicate: Callable[[str], bool]) -> Callable[[str], str | None]:
        return lambda text: None if is_duplicate(text) else text

    factories = {
        "normalize": lambda: normalize,
        "length": lambda: _length_step(c),
        "word_length": lambda: _word_length_step(c),
        "symbols": lambda: _symbols_step(c),
        "alpha": lambda: _alpha_step(c),
        "repeated_lines": lambda: _repeated_lines_step(c),
        "top_ngrams": lambda: _ngram_step(quality.top_ngram_char_fraction, c.max_top_ngram_fractions),
        "duplicate_ngrams": lambda: _ngram_step(quality.duplicate_ngram_char_fraction, c.max_duplicate_ngram_fractions),
        "exact_dedup": lambda: dropping(ExactDeduplicator().is_duplicate),
        "near_dedup": lambda: dropping(
            NearDeduplicator(
                c.minhash_num_perm, c.minhash_bands, c.near_dup_threshold, c.shingle, c.shingle_size, c.seed
            ).is_duplicate
        ),
        "pii": lambda: lambda text: scrub_pii(text, pii_counts),
    }
    return [(name, factories[name]()) for name in STEP_NAMES if name in c.steps]


def clean_items(
    items: Iterable[tuple[T, str]], config: CleanConfig | None = None, report: CleanReport | None = None
) -> Iterator[tuple[T, str]]:
    """(payload, cleaned text) for each (payload, text) that survives every step, lazily, in input order.

    The payload (e.g. the JSON record a text came from) is passed through untouched; `report.steps`
    collects the per-step counts as the stream is consumed."""
    config = config or CleanConfig()
    report = report if report is not None else CleanReport()
    steps = build_steps(config, report.pii)
    report.steps = [StepStats(name) for name, _ in steps]
    for payload, text in items:
        for (_, step), stats in zip(steps, report.steps, strict=False):
            stats.docs_in += 1
            stats.chars_in += len(text)
            result = step(text)
            if result is None:
                break
            text = result
            stats.docs_out += 1
            stats.chars_out += len(text)
        else:
            yield payload, text


def clean_texts(
    texts: Iterable[str], config: CleanConfig | None = None, report: CleanReport | None = None
) -> Iterator[str]:
    """The cleaned texts of `texts` (any iterable, consumed lazily), in order."""
    for _, text in clean_items(((None, t) for t in texts), config, report):
        yield text


def stats_path(output: str | Path) -> Path:
    """Where the run's statistics go: OUT.stats.json next to the output."""
    output = Path(output)
    return output.with_name(output.name + ".stats.json")


def clean_file(
    input: str | Path,
    output: str | Path,
    config: CleanConfig | None = None,
    input_format: str = "auto",
    text_field: str = "text",
    on_invalid_utf8: str = "replace",
    output_format: str = "auto",
) -> CleanReport:
    """Cleans `input` into `output` (JSONL records or plain text) and writes `output`.stats.json.

    Text output separates documents the way the input did: one per line for txt-lines input, a blank
    line otherwise. Both files are written atomically, the output first: an error while cleaning (bad input
    line, a document that text output cannot hold, a full disk) leaves neither behind, and so does a run
    that keeps no document at all (`NothingKeptError`, naming the step that removed the most)."""
    input, output = Path(input), Path(output)
    config = config or CleanConfig()
    if input.resolve() == output.resolve():
        raise ValueError(f"output {output} is the input file; choose another output path")
    if output.is_dir():
        raise ValueError(f"output {output} is a folder; give a file path, e.g. {output / 'clean.jsonl'}")
    in_format = resolve_input_format(input, input_format)
    out_format = resolve_output_format(output, output_format)
    report = CleanReport()
    documents = read_documents(input, in_format, text_field, on_invalid_utf8, report.read)
    items = ((doc, doc.text) for doc in documents)
    one_per_line = in_format == "txt-lines"
    field_name = text_field if in_format == "jsonl" else "text"
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {output.parent} does not exist; create it first")
    with write_errors_explained(output, "output path"):
        with atomic_path(output) as tmp, open_text_for_writing(tmp) as out:
            for doc, text in clean_items(items, config, report):
                if out_format == "jsonl":
                    record = {**doc.record, field_name: text} if doc.record is not None else {field_name: text}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                elif one_per_line:
                    if "\n" in text:
                        raise ValueError(
                            f"{input}:{doc.line}: document spans several lines, which one-per-line text output "
                            "cannot hold; write .jsonl output instead"
                        )
                    out.write(text + "\n")
                else:
                    if "\n\n" in text:
                        raise ValueError(
                            f"{input}:{doc.line}: document holds a blank line, which would split it in text "
                            "output; write .jsonl output instead, or pass --max-blank-lines 0"
                        )
                    out.write(text + "\n\n")
            if report.docs_out == 0:
                raise NothingKeptError(
                    f"kept 0 of {report.read.documents:,} documents of {input}: "
                    f"{explain_removals(report, config)}; nothing written",
                    report,
                )
        summary = {
            "input": str(input),
            "output": str(output),
            "input_format": in_format,
            "output_format": out_format,
            **report.to_dict(),
            "lsh_threshold": lsh_threshold(config.minhash_bands, config.minhash_num_perm // config.minhash_bands),
            "config": asdict(config),
        }
        write_json_atomic(stats_path(output), summary)
    return report
