"""Pretraining data: the run's tokenizer and its train/validation token streams or sentence pairs.

- Text objectives (causal LM, masked LM, span corruption): `data.dataset` is a catalog name, a user's
  file/folder/glob, or a folder written by `lmforge data prepare` (it holds meta.json: its memory-mapped
  token shards are read in place, with the tokenizer the shards were made with). A dataset without a
  validation split has its last `data.val_fraction` of the text (cut at a line) held out. Documents are
  joined with the tokenizer's end-of-text token when it has one.
- Translation: `data.dataset` is a translation dataset (`kjv-spanish`), records {data.source_lang: ...,
  data.target_lang: ...}. Each pair becomes (source ids + EOS, target ids + EOS), each side cut to
  `block_size` tokens; the held-out split is "validation" or "test" when the dataset has one, else the last
  `val_fraction` of the pairs. One tokenizer is learned on both sides, so source and target share one
  vocabulary (and the model one embedding matrix, as in Vaswani et al., 2017, 3.4).

The tokenizer ("char", "gpt2", "train" for a learned subword tokenizer of the objective's kind, or a path)
is built once and saved in `runs/<name>/tokenizer/` (`lmforge.train.tokenizer.run_tokenizer`).

Bits per byte needs tokens per byte of the validation text: bits/byte = loss / ln 2 * tokens / bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmforge.data.pipeline.loaders import TokenStream
from lmforge.data.tokenizers.tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer
from lmforge.pretrain.config import RunConfig
from lmforge.train.distributed import DistInfo
from lmforge.train.tokenizer import run_tokenizer

if TYPE_CHECKING:
    from lmforge.pretrain.objectives import PretrainObjective

SAMPLE_PAIRS = 5  # held-out pairs translated into samples.txt at the end of a translation run

Pairs = list[tuple[list[int], list[int]]]


@dataclass
class TrainData:
    """Token streams (text objectives) or (source, target) id pairs (translation) of one run; the objective
    turns either into batches."""

    tokenizer: Tokenizer
    train: TokenStream | Pairs
    val: TokenStream | Pairs
    val_tokens_per_byte: float
    objective: PretrainObjective
    config: RunConfig
    world_size: int = 1  # data-parallel replicas: processes that read different rows
    sample_pairs: list[tuple[str, str]] = field(default_factory=list)  # translation: held-out (source, reference)

    @property
    def n_train_tokens(self) -> int:
        if isinstance(self.train, TokenStream):
            return len(self.train)
        return sum(len(source) + len(target) for source, target in self.train)

    def train_loader(self, global_batch_size: int):
        """Infinite training batches of `global_batch_size` rows (all processes'); state_dict/load_state_dict."""
        return self.objective.loader(self, self.train, global_batch_size, self.config.train.seed)

    def val_batches(self, n_batches: int) -> list[dict]:
        """The same `n_batches` validation batches at every evaluation (seeded independently of training)."""
        global_batch = self.config.train.batch_size * self.world_size
        loader = self.objective.loader(self, self.val, global_batch, seed=12345)
        return [next(loader) for _ in range(n_batches)]


class Windows:
    """The training stream cut into consecutive, non-overlapping windows of `block` tokens (the tail shorter
    than one dropped): the fixed examples of a private causal-LM run. DP-SGD's guarantee is per example, so
    here per window: a text spread over several windows is protected per window, not as a whole."""

    def __init__(self, stream: TokenStream, block: int) -> None:
        self.stream, self.block = stream, block

    def __len__(self) -> int:
        return len(self.stream) // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ids = torch.from_numpy(self.stream.read(i * self.block, self.block))
        return {"input_ids": ids, "labels": ids}


def stack_windows(windows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Equal-length windows as one (B, T) batch, the shape `RandomWindows` gives."""
    ids = torch.stack([w["input_ids"] for w in windows])
    return {"input_ids": ids, "labels": ids}


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


def _load(config: RunConfig) -> Any:
    from lmforge.data.corpora.catalog import load_dataset

    try:
        return load_dataset(config.data.dataset)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; pass a text file or folder, a catalog name (lmforge data list) or a folder made by "
            "lmforge data prepare"
        ) from None


def _tokenizer(config: RunConfig, texts: list[str], run_dir: Path, info: DistInfo, objective, reuse: bool):
    dc = config.data
    return run_tokenizer(dc.tokenizer, texts, run_dir, info, objective.tokenizer_plan, dc.vocab_size, reuse)


def prepare_text(
    config: RunConfig, run_dir: Path, info: DistInfo, objective: PretrainObjective, reuse_tokenizer: bool
) -> TrainData:
    """Tokenizer and train/validation token streams for `config.data` (text or `data prepare` shards)."""
    source = Path(config.data.dataset)
    if (source / "meta.json").is_file():
        return _from_shards(config, source, info, objective)
    dataset = _load(config)
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
    tokenizer = _tokenizer(config, train_docs, run_dir, info, objective, reuse_tokenizer)
    train, val = encode(tokenizer, train_docs), encode(tokenizer, val_docs)
    val_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    return _streams(config, tokenizer, train, val, len(val) / max(val_bytes, 1), objective, info)


def encode_pairs(tokenizer: Tokenizer, records: list[dict], source: str, target: str, max_len: int) -> Pairs:
    """(source ids + EOS, target ids + EOS) per record, each side cut to `max_len` tokens (EOS kept)."""
    eos = tokenizer.eos_token_id

    def ids(texts: list[str]) -> list[list[int]]:
        return [
            row[: max_len - 1] + [eos] for row in tokenizer.encode_batch(texts, add_special_tokens=False)["input_ids"]
        ]

    return list(zip(ids([r[source] for r in records]), ids([r[target] for r in records]), strict=True))


def prepare_pairs(
    config: RunConfig, run_dir: Path, info: DistInfo, objective: PretrainObjective, reuse_tokenizer: bool
) -> TrainData:
    """Translation: a tokenizer learned on both sides of the training pairs, and the train/held-out id pairs."""
    dc, name = config.data, config.data.dataset
    if (Path(name) / "meta.json").is_file():
        raise ValueError(f"{name} holds token shards; translation needs sentence pairs, e.g. data.dataset=kjv-spanish")
    dataset = _load(config)
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
    tokenizer = _tokenizer(config, texts, run_dir, info, objective, reuse_tokenizer)
    if None in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        raise ValueError(
            f"translation needs a tokenizer with pad, bos and eos tokens; {dc.tokenizer!r} lacks one: "
            "use data.tokenizer=train or data.tokenizer=char"
        )
    train, val = (
        encode_pairs(tokenizer, r, dc.source_lang, dc.target_lang, dc.block_size) for r in (records, held_out)
    )
    batch = config.train.batch_size * info.dp_size
    for split, pairs in (("train", train), ("validation", val)):
        if len(pairs) < batch:
            raise ValueError(
                f"the {split} split has {len(pairs)} pairs, fewer than one batch of {batch}; "
                "use more pairs (data.max_pairs) or a smaller train.batch_size"
            )
    val_bytes = sum(len(r[dc.target_lang].encode("utf-8")) for r in held_out)
    tokens_per_byte = sum(len(target) for _, target in val) / max(val_bytes, 1)  # loss is over target tokens
    samples = [(r[dc.source_lang], r[dc.target_lang]) for r in held_out[:SAMPLE_PAIRS]]
    return TrainData(tokenizer, train, val, tokens_per_byte, objective, config, info.dp_size, samples)


def _from_shards(config: RunConfig, folder: Path, info: DistInfo, objective: PretrainObjective) -> TrainData:
    from lmforge.data.pipeline.shards import read_meta

    meta = read_meta(folder)
    spec = meta.get("plan", meta).get("tokenizer", "gpt2")
    tokenizer = gpt2_tokenizer() if spec == "gpt2" else load_tokenizer(spec)
    train, val = TokenStream(folder, "train"), TokenStream(folder, "validation")
    text_bytes = sum(s.get("bytes", 0) for s in meta.get("plan", {}).get("sources", []))
    total = sum(split["tokens"] for split in meta["splits"].values())
    ratio = total / text_bytes if text_bytes else float("nan")  # bytes per token from the whole corpus
    return _streams(config, tokenizer, train, val, ratio, objective, info)


def _streams(config, tokenizer, train, val, tokens_per_byte, objective, info) -> TrainData:
    block = config.data.block_size
    for name, tokens in (("train", train), ("validation", val)):
        if len(tokens) < block:
            raise ValueError(
                f"the {name} split has {len(tokens)} tokens, fewer than data.block_size={block}; "
                "use more data or a smaller block"
            )
    wrap = lambda t: t if isinstance(t, TokenStream) else TokenStream(t)  # noqa: E731
    return TrainData(tokenizer, wrap(train), wrap(val), tokens_per_byte, objective, config, info.dp_size)
