"""Tokenizer and token streams for a pretraining run, from a catalog dataset, the user's text files or shards.

- `data.dataset` is a catalog name (`lmforge data list`) or a file/folder/glob of text: its documents are
  encoded in memory (fine up to a few hundred MB of text); the "validation" split is used when the dataset
  has one, else the last `val_fraction` of the text (cut at a line) is held out. Documents are joined with
  the tokenizer's end-of-text token when it has one.
- `data.dataset` is a folder written by `lmforge data prepare` (it holds meta.json): its memory-mapped
  token shards are read in place, with the tokenizer the shards were made with.

- translation (the `transformer` family): `data.dataset` is a translation dataset (`kjv-spanish`), records
  {data.source_lang: ..., data.target_lang: ...}. Each pair becomes (source ids + EOS, target ids + EOS),
  each side cut to `block_size` tokens; the held-out split is "validation" or "test" when the dataset has
  one, else the last `val_fraction` of the pairs. One tokenizer is learned on both sides, so source and
  target share one vocabulary (and the model one embedding matrix, as in Vaswani et al., 2017, 3.4).

The tokenizer ("char", "gpt2", "train" for a byte-level BPE, or a path) is built once and saved in
`runs/<name>/tokenizer/`, so a resumed run (and every DDP process) uses the very same ids.

Bits per byte needs tokens per byte of the validation text: bits/byte = loss / ln 2 * tokens / bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.loaders import (
    MLMBatches,
    MLMMasker,
    RandomWindows,
    Seq2SeqBatches,
    SpanCorruptionBatches,
    SpanCorruptor,
    TokenStream,
)
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.train.config import RunConfig
from lmforge.train.distributed import DistInfo, barrier

MLM_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's pad (= decoder start) and EOS
T5_SENTINELS = 100
TRANSLATION_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2: the Transformer's pad, bos, eos
SAMPLE_PAIRS = 5  # held-out pairs translated into samples.txt at the end of a translation run

Pairs = list[tuple[list[int], list[int]]]


class Endless:
    """An epoch loader (iterate again for the next epoch) as one infinite iterator with the loader's state."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> Endless:
        return self

    def __next__(self):
        for _ in range(2):  # at most one epoch boundary per batch
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                self.iterator = None
        raise RuntimeError("the training data yields no batch; use more data or a smaller batch")

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.iterator = None


@dataclass
class TrainData:
    """Token streams (language modelling) or (source, target) id pairs (translation) of one run."""

    tokenizer: Tokenizer
    train: TokenStream | Pairs
    val: TokenStream | Pairs
    val_tokens_per_byte: float
    objective: str
    config: RunConfig
    world_size: int = 1
    sample_pairs: list[tuple[str, str]] = field(default_factory=list)  # translation: held-out (source, reference)

    @property
    def n_train_tokens(self) -> int:
        if isinstance(self.train, TokenStream):
            return len(self.train)
        return sum(len(source) + len(target) for source, target in self.train)

    def _loader(self, stream: TokenStream | Pairs, batch_size: int, seed: int):
        block = self.config.data.block_size
        if self.objective == "translation":  # full batches only, so every DDP process gets its rows
            return Endless(Seq2SeqBatches(stream, batch_size, self.tokenizer.pad_token_id, seed=seed, drop_last=True))
        if self.objective == "masked_lm":
            tok = self.tokenizer
            masker = MLMMasker(tok.vocab_size, tok.mask_token_id, tok.all_special_ids, self.config.data.mlm_probability)
            loader = MLMBatches(
                stream,
                batch_size,
                block,
                masker,
                seed=seed,
                cls_id=tok.cls_token_id,
                sep_id=tok.sep_token_id,
                pad_id=tok.pad_token_id or 0,
            )
            return Endless(loader)
        if self.objective == "span_corruption":
            tok = self.tokenizer
            sentinel_start = tok.token_to_id("<extra_id_0>")
            if sentinel_start is None:
                raise ValueError(
                    "span corruption needs a tokenizer with T5's sentinels (<extra_id_0>, ...); "
                    "use data.tokenizer=char or data.tokenizer=train"
                )
            corruptor = SpanCorruptor(tok.eos_token_id, sentinel_start, self.config.data.noise_density)
            return Endless(
                SpanCorruptionBatches(stream, batch_size, block, corruptor, seed=seed, pad_id=tok.pad_token_id or 0)
            )
        return RandomWindows(stream, batch_size, block, seed=seed)

    def train_loader(self, global_batch_size: int):
        """Infinite training batches of `global_batch_size` rows (all processes'); state_dict/load_state_dict."""
        return self._loader(self.train, global_batch_size, self.config.train.seed)

    def val_batches(self, n_batches: int) -> list[dict]:
        """The same `n_batches` validation batches at every evaluation (seeded independently of training)."""
        global_batch = self.config.train.batch_size * self.world_size
        loader = self._loader(self.val, global_batch, seed=12345)
        return [next(loader) for _ in range(n_batches)]


def _specials(objective: str) -> list[str] | None:
    return {"masked_lm": MLM_SPECIALS, "span_corruption": T5_SPECIALS, "translation": TRANSLATION_SPECIALS}.get(
        objective
    )


def _train_tokenizer(kind: str, texts: list[str], objective: str, vocab_size: int, folder: Path) -> None:
    from lmforge.data.tokenizer_train import DEFAULT_SPECIAL_TOKENS, save_tokenizer, train_tokenizer

    if kind == "bpe":  # BERT's and T5's own kinds
        kind = {"masked_lm": "wordpiece", "span_corruption": "unigram"}.get(objective, kind)
    specials = _specials(objective) or DEFAULT_SPECIAL_TOKENS[kind]
    extra_ids = T5_SENTINELS if objective == "span_corruption" else 0
    backend = train_tokenizer(texts, kind=kind, vocab_size=vocab_size, special_tokens=specials, extra_ids=extra_ids)
    save_tokenizer(backend, folder, kind, specials)


def build_tokenizer(
    config: RunConfig, train_texts: list[str], run_dir: Path, info: DistInfo, objective: str, reuse: bool
):
    """The run's tokenizer. "char" and "train" are learned by process 0 and saved in run_dir/tokenizer, which a
    resumed run (`reuse`) and the other processes read back, so every one of them uses the very same ids."""
    spec, folder = config.data.tokenizer, run_dir / "tokenizer"
    if spec == "gpt2":
        from lmforge.data.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer()
    if spec not in ("char", "train"):
        return load_tokenizer(spec)
    if info.is_main and not (reuse and (folder / "tokenizer.json").is_file()):
        kind = "char" if spec == "char" else "bpe"
        _train_tokenizer(kind, train_texts, objective, config.data.vocab_size, folder)
    barrier(info)  # every process, always: the others read what process 0 wrote
    return load_tokenizer(folder)


def split_validation(text: str, fraction: float) -> tuple[str, str]:
    """(train, validation): the last `fraction` of the text, moved back to the start of a line."""
    cut = int(len(text) * (1 - fraction))
    line = text.rfind("\n", 0, cut)
    cut = line + 1 if line > 0 else cut
    return text[:cut], text[cut:]


def encode(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    """Documents as one int64 token array, joined with the end-of-text id when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    pieces = []
    for i, document in enumerate(documents):
        if i and eos is not None:
            pieces.append(np.array([eos], dtype=np.int64))
        pieces.append(np.asarray(tokenizer.encode(document, add_special_tokens=False), dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


def prepare_data(
    config: RunConfig, run_dir: Path, info: DistInfo, objective: str, reuse_tokenizer: bool = False
) -> TrainData:
    """Tokenizer and train/validation token streams for `config.data`."""
    source = Path(config.data.dataset)
    if (source / "meta.json").is_file() and objective == "translation":
        raise ValueError(
            f"{source} holds token shards; translation needs sentence pairs, e.g. data.dataset=kjv-spanish"
        )
    if (source / "meta.json").is_file():
        return _from_shards(config, source, info, objective)
    from lmforge.data.catalog import load_dataset

    try:
        dataset = load_dataset(config.data.dataset)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; pass a text file or folder, a catalog name (lmforge data list) or a folder made by "
            "lmforge data prepare"
        ) from None
    if objective == "translation":
        return prepare_pairs(config, dataset, run_dir, info, reuse_tokenizer)
    if dataset.kind != "text":
        raise ValueError(
            f"dataset {config.data.dataset!r} holds {dataset.kind} records; pretraining needs text (lmforge data list)"
        )
    train_docs = [d for d in dataset.splits["train"] if d]
    val_docs = [d for d in dataset.splits.get("validation", []) if d]
    if not val_docs:
        joined = "\n\n".join(train_docs)
        if not joined.strip():
            raise ValueError(f"dataset {config.data.dataset!r} holds no text")
        train_text, val_text = split_validation(joined, config.data.val_fraction)
        train_docs, val_docs = [train_text], [val_text]
    tokenizer = build_tokenizer(config, train_docs, run_dir, info, objective, reuse_tokenizer)
    train, val = encode(tokenizer, train_docs), encode(tokenizer, val_docs)
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    return _data(config, tokenizer, train, val, len(val) / max(val_bytes, 1), objective, info)


def encode_pairs(tokenizer: Tokenizer, records: list[dict], source: str, target: str, max_len: int) -> Pairs:
    """(source ids + EOS, target ids + EOS) per record, each side cut to `max_len` tokens (EOS kept)."""
    eos = tokenizer.eos_token_id

    def ids(texts: list[str]) -> list[list[int]]:
        return [
            row[: max_len - 1] + [eos] for row in tokenizer.encode_batch(texts, add_special_tokens=False)["input_ids"]
        ]

    return list(zip(ids([r[source] for r in records]), ids([r[target] for r in records]), strict=True))


def prepare_pairs(config: RunConfig, dataset, run_dir: Path, info: DistInfo, reuse_tokenizer: bool) -> TrainData:
    """Translation: a tokenizer learned on both sides of the training pairs, and the train/held-out id pairs."""
    dc, name = config.data, config.data.dataset
    if dataset.kind != "translation":
        raise ValueError(f"dataset {name!r} holds {dataset.kind} records; translation needs pairs, e.g. kjv-spanish")
    records = list(dataset.splits["train"])
    held_out = next((list(dataset.splits[s]) for s in ("validation", "test") if dataset.splits.get(s)), None)
    if dc.max_pairs:
        records = records[: dc.max_pairs]
    if not records:
        raise ValueError(f"dataset {name!r} holds no training pairs")
    for lang in (dc.source_lang, dc.target_lang):
        if lang not in records[0]:
            fields = ", ".join(k for k in records[0] if k != "id")
            raise ValueError(
                f"{lang!r} is not a field of {name}'s records; set data.source_lang/target_lang to {fields}"
            )
    if held_out is None:
        cut = max(1, int(len(records) * dc.val_fraction))
        records, held_out = records[:-cut], records[-cut:]
    texts = [r[dc.source_lang] for r in records] + [r[dc.target_lang] for r in records]
    tokenizer = build_tokenizer(config, texts, run_dir, info, "translation", reuse_tokenizer)
    if None in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise ValueError(
            f"translation needs a tokenizer with pad, bos and eos tokens; {dc.tokenizer!r} lacks one: "
            "use data.tokenizer=train or data.tokenizer=char"
        )
    train, val = (
        encode_pairs(tokenizer, r, dc.source_lang, dc.target_lang, dc.block_size) for r in (records, held_out)
    )
    batch = config.train.batch_size * info.world_size
    for split, pairs in (("train", train), ("validation", val)):
        if len(pairs) < batch:
            raise ValueError(
                f"the {split} split has {len(pairs)} pairs, fewer than one batch of {batch}; "
                "use more pairs (data.max_pairs) or a smaller train.batch_size"
            )
    val_bytes = sum(len(r[dc.target_lang].encode("utf-8")) for r in held_out)
    tokens_per_byte = sum(len(target) for _, target in val) / max(val_bytes, 1)  # loss is over target tokens
    samples = [(r[dc.source_lang], r[dc.target_lang]) for r in held_out[:SAMPLE_PAIRS]]
    return TrainData(tokenizer, train, val, tokens_per_byte, "translation", config, info.world_size, samples)


def _from_shards(config: RunConfig, folder: Path, info: DistInfo, objective: str) -> TrainData:
    from lmforge.data.shards import read_meta
    from lmforge.data.tokenizer import gpt2_tokenizer

    meta = read_meta(folder)
    spec = meta.get("plan", meta).get("tokenizer", "gpt2")
    tokenizer = gpt2_tokenizer() if spec == "gpt2" else load_tokenizer(spec)
    train, val = TokenStream(folder, "train"), TokenStream(folder, "validation")
    text_bytes = sum(s.get("bytes", 0) for s in meta.get("plan", {}).get("sources", []))
    total = sum(split["tokens"] for split in meta["splits"].values())
    ratio = total / text_bytes if text_bytes else float("nan")  # bytes per token from the whole corpus
    return _data(config, tokenizer, train, val, ratio, objective, info)


def _data(config, tokenizer, train, val, tokens_per_byte, objective, info) -> TrainData:
    block = config.data.block_size
    for name, tokens in (("train", train), ("validation", val)):
        if len(tokens) < block:
            raise ValueError(
                f"the {name} split has {len(tokens)} tokens, fewer than data.block_size={block}; "
                "use more data or a smaller block"
            )
    wrap = lambda t: t if isinstance(t, TokenStream) else TokenStream(t)  # noqa: E731
    return TrainData(tokenizer, wrap(train), wrap(val), tokens_per_byte, objective, config, info.world_size)
