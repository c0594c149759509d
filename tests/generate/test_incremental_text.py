"""Incremental detokenization: the streamed text deltas of real BPE tokenizers add up to decoding all ids."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.generate.engine import _IncrementalText


def trained_tokenizer(kind: str):
    """A small BPE trained here: byte-level (GPT-2 style) or Metaspace (SentencePiece style, '▁' for spaces;
    its byte tokens are special tokens, which decoding skips, so a window may open on a skipped token)."""
    tokenizer = tokenizers.Tokenizer(models.BPE(byte_fallback=kind == "metaspace"))
    if kind == "bytelevel":
        tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.pre_tokenizer, tokenizer.decoder = (
            pre_tokenizers.Metaspace(),
            decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]),
        )
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, special_tokens=alphabet)
    tokenizer.train_from_iterator(["the cat sat on the mat", "naïve café", "a tiny corpus of words"] * 20, trainer)
    return tokenizer


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_incremental_text_deltas_add_up_to_decoding_all_ids(kind):
    tokenizer = trained_tokenizer(kind)
    text = "the cat sat on the naïve café → 東京 😀 mat"
    token_ids = tokenizer.encode(text).ids
    tracker = _IncrementalText(tokenizer, stop_strings=[])
    deltas = [tracker.push(i) for i in token_ids] + [tracker.flush()]
    assert "".join(deltas) == tokenizer.decode(token_ids)
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_text_decodes_a_bounded_window_per_token_not_the_whole_text():
    from lmforge.commands.generate import ByteTokenizer

    class CountingTokenizer(ByteTokenizer):
        decoded = 0

        def decode(self, ids: list[int]) -> str:
            CountingTokenizer.decoded += len(ids)
            return super().decode(ids)

    text = ("héllo wörld, " * 200).encode("utf-8")
    tracker = _IncrementalText(CountingTokenizer(), stop_strings=["STOP"])
    deltas = [tracker.push(b) for b in text] + [tracker.flush()]
    assert "".join(deltas) == text.decode("utf-8")
    assert CountingTokenizer.decoded < 10 * len(text)  # decoding everything each step: ~len(text)^2 / 2
