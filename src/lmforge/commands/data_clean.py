"""`lmforge data clean IN OUT`: the cleaning pipeline. Its step flags are generated from the fields of
`lmforge.data.cleaning.clean.CleanConfig`, so the CLI, the library and the docs share one source."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _show(value) -> str:
    return f"{value[0]}:{value[1]}" if isinstance(value, tuple) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from lmforge.data.cleaning.clean import CleanConfig

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
    from lmforge.data.cleaning.clean import STEP_NAMES, CleanConfig, parse_steps

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
    """Cleans, prints the per-step table, then warns on stderr when invalid UTF-8 was met or when one step
    removed most documents (naming the settings that relax it); keeping nothing is an error."""
    from rich.console import Console

    from lmforge.data.cleaning.clean import NothingKeptError, clean_file, explain_removals, stats_path

    config = _config_from_args(args)
    console = Console()
    title = f"lmforge data clean: {args.input} -> {args.output}"
    try:
        report = clean_file(
            args.input,
            args.output,
            config,
            input_format=args.format,
            text_field=args.text_field,
            on_invalid_utf8=args.on_invalid_utf8,
            output_format=args.output_format,
        )
    except NothingKeptError as error:
        console.print(error.report.table(title=title))
        raise
    console.print(report.table(title=title))
    warning_lines = []
    if report.read.invalid_utf8_replaced:
        warning_lines.append(
            f"invalid UTF-8 in {report.read.invalid_utf8_replaced:,} document(s) of {args.input}, bytes replaced "
            "with U+FFFD (--on-invalid-utf8 skip drops such documents, fail stops at the first)"
        )
    if report.read.invalid_utf8_skipped:
        warning_lines.append(
            f"invalid UTF-8 in {report.read.invalid_utf8_skipped:,} document(s) of {args.input}, skipped "
            "(--on-invalid-utf8 replace keeps them with U+FFFD)"
        )
    if 2 * report.docs_out < report.read.documents:
        warning_lines.append(
            f"kept {report.docs_out:,} of {report.read.documents:,} documents: {explain_removals(report, config)}"
        )
    for warning in warning_lines:
        print(f"lmforge data clean: warning: {warning}", file=sys.stderr)
    if "pii" in config.steps:
        replaced = ", ".join(f"{kind} {n}" for kind, n in sorted(report.pii.items())) or "none"
        console.print(f"PII replaced: {replaced}", highlight=False)
    console.print(
        f"kept {report.docs_out:,} of {report.read.documents:,} documents; stats in {stats_path(args.output)}",
        highlight=False,
    )


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds `data clean`."""
    from lmforge.data.cleaning.clean_io import INPUT_FORMATS, INVALID_UTF8_POLICIES, OUTPUT_FORMATS

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
