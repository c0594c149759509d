"""Train a tokenizer on text files: byte-level BPE, WordPiece, Unigram or characters, saved as `tokenizer.json`.

Every kind is a `tokenizers.Tokenizer` pipeline (normalizer -> pre-tokenizer -> model -> post-processor,
and a decoder back to text), so one file format serves them all and `tokenizers.Tokenizer.from_file` loads
any of them. The pipelines follow the models that made each kind popular:

- bpe: GPT-2's byte-level BPE (Radford et al., 2019). Text is split with GPT-2's regex, each piece mapped
  to bytes shown as printable characters, and merges learned over those bytes. No normalizer and no unknown
  token: every string encodes, and decoding gives back exactly the input.
- wordpiece: BERT's (Devlin et al., 2019). Unicode cleanup and lowercasing (unless cased), split on
  whitespace and punctuation, continuation pieces start with `##`; `encode` wraps text as
  `[CLS] A [SEP]` (pairs `[CLS] A [SEP] B [SEP]`, second segment with type id 1).
- unigram: T5's SentencePiece-style unigram LM (Kudo, 2018). NFKC normalisation, spaces become `▁`,
  `encode` appends `</s>`. `extra_ids` adds T5's sentinels `<extra_id_0>`... at the top of the vocabulary,
  `<extra_id_0>` holding the highest id, as T5 does for span corruption.
- char: one token per character of the corpus (nanoGPT's shakespeare-char): a WordLevel model over the
  distinct characters and a pre-tokenizer that isolates each character. Decoding is exact for any text made
  of characters seen in training; others encode to the unknown token.

Special tokens take the first ids in the order given (0, 1, ...), then the learned vocabulary follows.
Default specials per kind are in `DEFAULT_SPECIAL_TOKENS`. `tokenizer_config.json` next to the tokenizer
names the roles (bos/eos/pad/unk/mask/cls/sep) so data preparation and loaders find them without guessing.

`vocab_size` is a ceiling: BPE and WordPiece stop merging when no pair (or word) is seen `min_frequency`
times any more, and Unigram keeps only the pieces that the corpus supports, so a small corpus gives a smaller
vocabulary. `train_tokenizer` then issues a `VocabularyShortfallWarning` with the size reached and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.io import write_json_atomic, write_text_atomic

KINDS = ("bpe", "wordpiece", "unigram", "char")

DEFAULT_SPECIAL_TOKENS: dict[str, list[str]] = {
    "bpe": ["<|endoftext|>"],
    "char": ["<|endoftext|>", "<unk>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<pad>", "</s>", "<unk>"],
}

# Which special token plays which role, by name; a role whose token is not among the specials stays None.
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "bos_token": ("<|endoftext|>", "<s>", "[CLS]", "<bos>"),
    "eos_token": ("<|endoftext|>", "</s>", "[SEP]", "<eos>"),
    "pad_token": ("[PAD]", "<pad>"),
    "unk_token": ("[UNK]", "<unk>"),
    "mask_token": ("[MASK]", "<mask>"),
    "cls_token": ("[CLS]",),
    "sep_token": ("[SEP]",),
}


class VocabularyShortfallWarning(UserWarning):
    """The corpus could not fill the requested vocabulary; the message gives the size reached and why."""


def special_token_roles(special_tokens: list[str]) -> dict[str, str | None]:
    """{"bos_token": ..., "eos_token": ..., ...}: the first candidate of each role present in the specials."""
    return {role: next((t for t in names if t in special_tokens), None) for role, names in ROLE_CANDIDATES.items()}


def _text_batches(documents: Iterable[str]) -> Iterator[str]:
    """Lines of the documents (newlines kept), so the trainers parallelise over many small items."""
    for document in documents:
        yield from document.splitlines(keepends=True)


def _build_bpe(vocab_size: int, specials: list[str], min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    return tokenizer, trainer


def _build_wordpiece(
    vocab_size: int, specials: list[str], min_frequency: int, lowercase: bool
) -> tuple[Tokenizer, trainers.Trainer]:
    roles = special_token_roles(specials)
    if roles["unk_token"] is None:
        raise ValueError("wordpiece needs an unknown token among --special-tokens, e.g. [UNK]")
    tokenizer = Tokenizer(models.WordPiece(unk_token=roles["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    return tokenizer, trainer


def _build_unigram(vocab_size: int, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    roles = special_token_roles(specials)
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token=roles["unk_token"], show_progress=False
    )
    return tokenizer, trainer


def _char_tokenizer(documents: Iterable[str], specials: list[str]) -> Tokenizer:
    """WordLevel over specials + the sorted distinct characters; each character is its own pre-token."""
    roles = special_token_roles(specials)
    if roles["unk_token"] is None:
        raise ValueError("char needs an unknown token among --special-tokens, e.g. <unk>")
    chars: set[str] = set()
    for document in documents:
        chars.update(document)
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(chars):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=roles["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join the characters with nothing between them
    return tokenizer


def train_tokenizer(
    documents: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    lowercase: bool = True,
    extra_ids: int = 0,
) -> Tokenizer:
    """A trained `tokenizers.Tokenizer` of `kind` (see the module docstring). `vocab_size` counts the
    special tokens (not the `extra_ids` sentinels, added on top as T5 does); it is ignored for char, whose
    vocabulary is the corpus's characters. `lowercase` applies to wordpiece only."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    specials = list(DEFAULT_SPECIAL_TOKENS[kind] if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens {specials} contain duplicates; list each once")
    if kind != "char" and vocab_size <= len(specials):
        raise ValueError(f"--vocab-size {vocab_size} leaves no room beyond the {len(specials)} special tokens")
    if extra_ids < 0:
        raise ValueError(f"extra_ids={extra_ids} must be >= 0")
    seen = {"chars": 0}

    def counted(docs: Iterable[str]) -> Iterator[str]:
        for document in docs:
            seen["chars"] += len(document)
            yield document

    documents = counted(documents)
    if kind == "char":
        tokenizer = _char_tokenizer(documents, specials)
    else:
        if kind == "bpe":
            tokenizer, trainer = _build_bpe(vocab_size, specials, min_frequency)
        elif kind == "wordpiece":
            tokenizer, trainer = _build_wordpiece(vocab_size, specials, min_frequency, lowercase)
        else:
            tokenizer, trainer = _build_unigram(vocab_size, specials)
        tokenizer.train_from_iterator(_text_batches(documents), trainer)
    if seen["chars"] == 0:
        raise ValueError("the input holds no text to learn a vocabulary from; pass non-empty text files")
    tokenizer.add_special_tokens(specials)  # already in the vocabulary: marks them special, keeps their ids
    roles = special_token_roles(specials)
    if kind == "wordpiece" and roles["cls_token"] and roles["sep_token"]:
        cls, sep = roles["cls_token"], roles["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
        )
    if kind == "unigram" and roles["eos_token"]:
        eos = roles["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, tokenizer.token_to_id(eos))]
        )
    if extra_ids:  # added in reverse so that <extra_id_0> gets the highest id
        tokenizer.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(extra_ids))])
    reached = tokenizer.get_vocab_size(with_added_tokens=True) - extra_ids
    if kind != "char" and reached < vocab_size:
        message = _shortfall(kind, reached, vocab_size, min_frequency, seen["chars"])
        warnings.warn(message, VocabularyShortfallWarning, stacklevel=2)
    return tokenizer


def _shortfall(kind: str, reached: int, vocab_size: int, min_frequency: int, chars: int) -> str:
    """Why training stopped short of `vocab_size`, and the ways out."""
    if kind == "unigram":
        why = f"the unigram model found no more pieces worth keeping in {chars:,} characters"
        fix = "use more text"
    else:
        times = "once" if min_frequency <= 1 else f"{min_frequency} times"
        why = f"{chars:,} characters hold no more merges seen at least {times} (--min-frequency {min_frequency})"
        fix = "use more text" + (", a lower --min-frequency" if min_frequency > 1 else "")
    return f"vocabulary of {reached:,} tokens, not the {vocab_size:,} asked: {why}; {fix} or --vocab-size {reached}"


def tokenizer_config(
    tokenizer: Tokenizer, kind: str, special_tokens: list[str], requested_vocab_size: int | None = None
) -> dict:
    """The roles of the special tokens (name and id), the kind and the full vocabulary size; with
    `requested_vocab_size`, also the size asked for, which a small corpus may leave unfilled."""
    config: dict = {"kind": kind, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    if requested_vocab_size is not None:
        config["requested_vocab_size"] = requested_vocab_size
    for role, token in special_token_roles(special_tokens).items():
        config[role] = token
        config[role.replace("_token", "_token_id")] = None if token is None else tokenizer.token_to_id(token)
    config["special_tokens"] = special_tokens
    added = tokenizer.get_added_tokens_decoder().values()
    config["extra_ids"] = sum(t.content.startswith("<extra_id_") for t in added)
    return config


def check_output_folder(out: str | Path) -> None:
    """Refuses an output path that is an existing file (callers check before training, not after)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; a tokenizer is saved as a folder, choose a new or existing folder")


def save_tokenizer(
    tokenizer: Tokenizer,
    out_dir: str | Path,
    kind: str,
    special_tokens: list[str],
    requested_vocab_size: int | None = None,
) -> Path:
    """Writes `out_dir/tokenizer_config.json` (with `requested_vocab_size` when given) then
    `out_dir/tokenizer.json`, each atomically; the tokenizer file is written last, so its presence means both
    are complete. Returns the tokenizer.json path."""
    out = Path(out_dir)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config(tokenizer, kind, special_tokens, requested_vocab_size)
    write_json_atomic(out / "tokenizer_config.json", config)
    write_text_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    return out / "tokenizer.json"
