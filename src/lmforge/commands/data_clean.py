"""`lmforge data clean IN OUT`: the cleaning pipeline. Its step flags are generated from the fields of
`lmforge.data.clean.CleanConfig`, so the CLI, the library and the docs share one source."""

from __future__ import annotations

import argparse
import dataclasses


def _show(value) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from lmforge.data.clean import CleanConfig

    group = parser.add_argument_group("pipeline (filter defaults: Gopher's rules, Rae et al. 2021, App. A)")
    for f in dataclasses.fields(CleanConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = ",".join(_show(v) for v in default) if isinstance(default, tuple) else default
        shown = "no limit" if default is None else shown
        help_text = f"{f.metadata['help']} (default: {shown})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parse = f.metadata.get("parse", type(default))
            group.add_argument(flag, type=parse, choices=f.metadata.get("choices"), default=None, help=help_text)


def _config_from_args(args: argparse.Namespace):
    from lmforge.data.clean import STEP_NAMES, CleanConfig, parse_steps

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CleanConfig)
        if getattr(args, f.name, None) is not None
    }
    if args.skip:
        skipped = parse_steps(args.skip)
        overrides["steps"] = tuple(s for s in overrides.get("steps", STEP_NAMES) if s not in skipped)
    return CleanConfig(**overrides)


def cmd_clean(args: argparse.Namespace) -> None:
    from rich.console import Console

    from lmforge.data.clean import clean_file, stats_path

    config = _config_from_args(args)
    report = clean_file(
        args.input,
        args.output,
        config,
        input_format=args.format,
        text_field=args.text_field,
        on_invalid_utf8=args.on_invalid_utf8,
        output_format=args.output_format,
    )
    console = Console()
    console.print(report.table(title=f"lmforge data clean: {args.input} -> {args.output}"))
    notes = []
    if report.read.invalid_utf8_replaced or report.read.invalid_utf8_skipped:
        notes.append(
            f"invalid UTF-8: {report.read.invalid_utf8_replaced} document(s) repaired with U+FFFD, "
            f"{report.read.invalid_utf8_skipped} skipped"
        )
    if "pii" in config.steps:
        replaced = ", ".join(f"{kind} {n}" for kind, n in sorted(report.pii.items())) or "none"
        notes.append(f"PII replaced: {replaced}")
    notes.append(f"kept {report.docs_out:,} of {report.read.documents:,} documents; stats in {stats_path(args.output)}")
    for note in notes:
        console.print(note, highlight=False)


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds `data clean`."""
    from lmforge.data.clean_io import INPUT_FORMATS, INVALID_UTF8_POLICIES, OUTPUT_FORMATS

    p = groups["data"].add_parser(
        "clean",
        help="normalise, filter, deduplicate and scrub PII from a text or JSONL corpus",
        description="Streams IN through normalisation, Gopher quality and repetition filters, exact and "
        "MinHash near-deduplication and PII scrubbing; writes OUT atomically, prints a table of documents "
        "and characters per step and saves it as OUT.stats.json.",
    )
    p.add_argument("input", help="a .txt or .jsonl file, optionally .gz/.bz2/.zst compressed")
    p.add_argument("output", help="output file: .jsonl (records) or anything else (plain text); may be compressed")
    p.add_argument(
        "--format",
        choices=INPUT_FORMATS,
        default="auto",
        help="input layout: txt-blank (documents separated by blank lines), txt-lines (one per line) or "
        "jsonl; auto = jsonl for .jsonl/.ndjson/.json names, else txt-blank",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument(
        "--on-invalid-utf8",
        choices=INVALID_UTF8_POLICIES,
        default="replace",
        help="bytes that are not UTF-8: replace with U+FFFD, skip the document, or fail (default: replace)",
    )
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="auto", help="auto = by OUT's name")
    p.add_argument("--skip", default="", metavar="STEPS", help="steps to leave out, comma-separated: pii,near_dedup")
    _add_config_flags(p)
    p.set_defaults(func=cmd_clean)
