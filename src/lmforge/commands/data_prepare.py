"""`lmforge data prepare` and `lmforge tokenizer train`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Trains and saves; warnings from training (a vocabulary the corpus cannot fill) go to stderr as one
    line each."""
    from lmforge.data.pipeline.shards import read_documents, resolve_inputs
    from lmforge.data.tokenizers.train import (
        DEFAULT_SPECIAL_TOKENS,
        check_output_folder,
        save_tokenizer,
        train_tokenizer,
    )
    from lmforge.io import write_errors_explained

    check_output_folder(args.out)
    files = resolve_inputs(args.inputs)
    specials = DEFAULT_SPECIAL_TOKENS[args.kind] if args.special_tokens is None else args.special_tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = train_tokenizer(
            read_documents(files, args.text_field, args.txt_unit),
            kind=args.kind,
            vocab_size=args.vocab_size,
            special_tokens=specials,
            min_frequency=args.min_frequency,
            lowercase=not args.cased,
            extra_ids=args.extra_ids,
        )
    for warning in caught:
        print(f"lmforge tokenizer train: warning: {warning.message}", file=sys.stderr)
    requested = None if args.kind == "char" else args.vocab_size
    with write_errors_explained(args.out):
        path = save_tokenizer(tokenizer, args.out, args.kind, specials, requested)
    ids = ", ".join(f"{t}={tokenizer.token_to_id(t)}" for t in specials)
    print(f"wrote {path}: {args.kind}, vocabulary {tokenizer.get_vocab_size(with_added_tokens=True):,} ({ids})")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.pipeline.shards import prepare

    meta = prepare(
        args.inputs,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        seed=args.seed,
        chunk_chars=args.chunk_chars,
        max_shard_tokens=args.max_shard_tokens,
        text_field=args.text_field,
        txt_unit=args.txt_unit,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    splits = {name: {k: s[k] for k in ("tokens", "documents")} for name, s in meta["splits"].items()}
    print(json.dumps({"out": str(args.out), "dtype": meta["dtype"], "vocab_size": meta["vocab_size"], **splits}))


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs: .txt .md .jsonl .csv .parquet")
    p.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.csv/.parquet")
    p.add_argument("--txt-unit", choices=("file", "paragraph", "line"), default="file", help="what a .txt document is")


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = groups["tokenizer"].add_parser(
        "train",
        help="train a byte-level BPE, WordPiece, Unigram or char tokenizer on text files",
        description="Writes OUT/tokenizer.json (loadable by tokenizers.Tokenizer.from_file) and "
        "OUT/tokenizer_config.json (the roles of the special tokens). Special tokens get ids 0, 1, ... in "
        "the order given.",
    )
    _add_reading_options(p)
    p.add_argument("--kind", choices=("bpe", "wordpiece", "unigram", "char"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192, help="including special tokens (ignored for char)")
    p.add_argument(
        "--special-tokens",
        nargs="*",
        default=None,
        help="default per kind: bpe '<|endoftext|>'; char '<|endoftext|>' '<unk>'; "
        "wordpiece [PAD] [UNK] [CLS] [SEP] [MASK]; unigram <pad> </s> <unk>",
    )
    p.add_argument("--min-frequency", type=int, default=2, help="bpe/wordpiece: rarest pair or word to keep")
    p.add_argument("--cased", action="store_true", help="wordpiece: keep case (default lowercases, as BERT)")
    p.add_argument("--extra-ids", type=int, default=0, help="T5 sentinels <extra_id_N> added at the top ids")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_tokenizer_train)

    p = groups["data"].add_parser(
        "prepare",
        help="tokenise text into uint16/uint32 train/validation token files plus meta.json (resumable)",
        description="Each document is followed by the tokenizer's end-of-text token. Rerunning after an "
        "interruption resumes from the finished chunks; meta.json appears last, when the output is complete.",
    )
    _add_reading_options(p)
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json, a tokenizer.json, or gpt2")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation document draw")
    p.add_argument("--max-shard-tokens", type=int, default=None, help="split each split into numbered files")
    p.add_argument("--chunk-chars", type=int, default=1 << 18, help="characters per unit of work and of resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards in --out made from other inputs or settings (swapped in whole when complete)",
    )
    p.set_defaults(func=cmd_data_prepare)
