"""Batches for pretraining and fine-tuning, from token files or token lists, as torch tensors.

Five loaders, one per objective; every one is deterministic for a seed and can save and restore its
position (`state_dict` / `load_state_dict`), so a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen. Randomness for batch k of epoch e comes from a generator seeded with
(seed, e, k), never from a stream that has to be replayed, so restoring a position is O(1).

Causal-LM convention (the one lmforge models and Hugging Face use): `labels` equal `input_ids` and the model
shifts inside (position t predicts labels[t + 1]). A window of T tokens therefore trains T - 1 predictions;
nanoGPT's x = tokens[i:i+T], y = tokens[i+1:i+T+1] is the same thing with a window of T + 1.

- `RandomWindows`: nanoGPT's sampler. Each row is a window of `seq_len` tokens starting at a uniform
  position of the token stream; infinite.
- `PackedBatches`: the stream cut into consecutive blocks of `seq_len`, shuffled per epoch, each token in
  exactly one block per epoch. The last block is right-padded with labels -100; causal attention never lets
  a real token see the padding after it, so no attention_mask is needed.
- `MLMBatches`: BERT's masked LM (Devlin et al., 2019) over packed blocks, optionally wrapped in
  [CLS] ... [SEP]. `MLMMasker` selects 15% of the non-special tokens (or of whole words), replaces 80% of
  them with [MASK], 10% with a random non-special token and keeps 10%; labels are the original ids there and
  -100 elsewhere.
- `SpanCorruptionBatches`: T5's objective (Raffel et al., 2020, section 3.1.4). `SpanCorruptor` drops 15%
  of the tokens in spans of mean length 3; each span becomes a sentinel in the inputs, and the targets list
  each sentinel followed by the span it replaced, both ending with EOS. Sentinel i is `<extra_id_i>`, id
  `sentinel_start - i` (T5 puts them at the top of the vocabulary, `<extra_id_0>` last).
- `Seq2SeqBatches`: (source ids, target ids) pairs padded per batch; attention_mask marks real source
  tokens, labels are padded with -100.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.nn.loss import IGNORE_INDEX


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


# ------------------------------------------------------------------------------------------ token stream


class TokenStream:
    """Several token arrays (the shards of a split) read as one sequence."""

    def __init__(self, tokens: str | Path | np.ndarray | Sequence[np.ndarray], split: str = "train") -> None:
        if isinstance(tokens, (str, Path)):
            from lmforge.data.pipeline.shards import open_split

            arrays = open_split(tokens, split)
        elif isinstance(tokens, np.ndarray):
            arrays = [tokens]
        else:
            arrays = list(tokens)
        self.arrays = [a for a in arrays if len(a)]
        if not self.arrays:
            raise ValueError("the token stream is empty; prepare data first (lmforge data prepare)")
        self.ends = np.cumsum([len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64 (shorter at the end of the stream)."""
        if len(self.arrays) == 1:
            return self.arrays[0][start : start + length].astype(np.int64)
        pieces = []
        shard = int(np.searchsorted(self.ends, start, side="right"))
        while length > 0 and shard < len(self.arrays):
            offset = start - (int(self.ends[shard - 1]) if shard else 0)
            piece = self.arrays[shard][offset : offset + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


def check_state(state: dict, expected: dict) -> None:
    """Refuse a saved loader state whose settings differ from this loader's `expected` ones: resuming it
    would silently replay other batches than the interrupted run saw."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"loader state has {key}={state.get(key)!r} but this loader has {key}={value!r}; "
                "build the loader with the settings of the run that saved the state"
            )


class EpochCursor:
    """Position (epoch, batch) over `n_items` items split into batches, shuffled per epoch with (seed, epoch)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, shuffle: bool, drop_last: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if n_items < (batch_size if drop_last else 1):
            raise ValueError(f"{n_items} items cannot fill a batch of {batch_size}; lower batch_size")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.batch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_batches(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch, item indices) for the rest of the current epoch; then moves to the next epoch."""
        order = _rng(self.seed, self.epoch).permutation(self.n_items) if self.shuffle else np.arange(self.n_items)
        while self.batch < len(self):
            epoch, batch = self.epoch, self.batch
            self.batch += 1
            yield epoch, batch, order[batch * self.batch_size : (batch + 1) * self.batch_size]
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"loader state batch={state['batch']} is outside an epoch of {len(self)} batches")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# ------------------------------------------------------------------------------------------ causal LM


class RandomWindows:
    """Infinite (B, T) batches of windows at uniform random positions: {"input_ids", "labels"}, labels ==
    input_ids (the model shifts). Batch k draws its B starts from a generator seeded with (seed, k)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, split: str = "train") -> None:
        self.stream = tokens if isinstance(tokens, TokenStream) else TokenStream(tokens, split)
        if len(self.stream) < seq_len:
            raise ValueError(f"{len(self.stream)} tokens cannot fill one window of seq_len={seq_len}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.step = 0

    def starts(self, step: int) -> np.ndarray:
        """Start positions of the windows of batch `step`."""
        return _rng(self.seed, step).integers(0, len(self.stream) - self.seq_len + 1, size=self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        starts = self.starts(self.step)
        self.step += 1
        if len(self.stream.arrays) == 1:  # one fancy-indexing read from the memmap
            rows = self.stream.arrays[0][starts[:, None] + np.arange(self.seq_len)].astype(np.int64)
        else:
            rows = np.stack([self.stream.read(int(s), self.seq_len) for s in starts])
        input_ids = torch.from_numpy(rows)  # (B, T)
        return {"input_ids": input_ids, "labels": input_ids}

    def state_dict(self) -> dict:
        return {"loader": "RandomWindows", "step": self.step, "seed": self.seed, **self._shape()}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, {"loader": "RandomWindows", "seed": self.seed, **self._shape()})
        self.step = int(state["step"])

    def _shape(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "tokens": len(self.stream)}


class PackedBatches:
    """One epoch = every block of `seq_len` consecutive tokens once, blocks shuffled per epoch (seed, epoch).
    Iterating yields the rest of the current epoch; iterate again for the next one. Batches are
    {"input_ids", "labels"}; the short last block is padded with `pad_id` and labels -100."""

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_id: int = 0,
        split: str = "train",
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.stream = tokens if isinstance(tokens, TokenStream) else TokenStream(tokens, split)
        self.seq_len, self.pad_id = seq_len, pad_id
        n_blocks = -(-len(self.stream) // seq_len)
        self.cursor = EpochCursor(n_blocks, batch_size, seed, shuffle, drop_last)

    def __len__(self) -> int:
        return len(self.cursor)

    def blocks(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, lengths): the blocks at `indices`, right-padded to seq_len, and their real lengths."""
        rows = np.full((len(indices), self.seq_len), self.pad_id, dtype=np.int64)
        lengths = np.empty(len(indices), dtype=np.int64)
        for r, block in enumerate(indices):
            tokens = self.stream.read(int(block) * self.seq_len, self.seq_len)
            rows[r, : len(tokens)] = tokens
            lengths[r] = len(tokens)
        return rows, lengths

    def epoch_blocks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(epoch, batch, rows, lengths) for the rest of the epoch: the raw blocks other loaders build on."""
        for epoch, batch, indices in self.cursor.epoch_batches():
            yield epoch, batch, *self.blocks(indices)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _, _, rows, lengths in self.epoch_blocks():
            input_ids = torch.from_numpy(rows)
            labels = input_ids.masked_fill(torch.from_numpy(_padding(lengths, self.seq_len)), IGNORE_INDEX)
            yield {"input_ids": input_ids, "labels": labels}

    def state_dict(self) -> dict:
        return {"loader": type(self).__name__, **self.cursor.state_dict(), **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, {"loader": type(self).__name__, **self._settings()})
        self.cursor.load_state_dict(state)

    def _settings(self) -> dict:
        c = self.cursor
        return {"batch_size": c.batch_size, "seq_len": self.seq_len, "seed": c.seed, "tokens": len(self.stream)}


def _padding(lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) bool, True past each row's length."""
    return np.arange(width)[None, :] >= lengths[:, None]


# -------------------------------------------------------------------------------------------- masked LM


def word_starts_from_word_ids(word_ids: Sequence[int | None]) -> np.ndarray:
    """Word-start flags from a `tokenizers.Encoding.word_ids` list (from the tokenizer's offsets): a token
    starts a word when its word id differs from the previous token's; special tokens (None) stand alone."""
    starts = np.ones(len(word_ids), dtype=bool)
    for t in range(1, len(word_ids)):
        starts[t] = word_ids[t] is None or word_ids[t] != word_ids[t - 1]
    return starts


def continuation_table(vocab: dict[str, int], vocab_size: int | None = None) -> np.ndarray:
    """(vocab_size,) bool: True for tokens that continue the word before them, by the vocabulary's
    convention. WordPiece marks continuations with `##`. SentencePiece (`▁`) and byte-level BPE (`Ġ`, with
    spaces and control bytes shown as chars U+0100..U+0143) mark word starts: there a token continues a
    word when it lacks the marker and begins with a letter or digit (punctuation starts its own word)."""
    table = np.zeros(vocab_size or max(vocab.values()) + 1, dtype=bool)
    if any(token.startswith("##") for token in vocab):
        for token, i in vocab.items():
            table[i] = token.startswith("##")
        return table
    byte_level = "Ġ" in vocab or any(token.startswith("Ġ") for token in vocab)
    for token, i in vocab.items():
        first = token[:1]
        remapped_byte = byte_level and first and 0x100 <= ord(first) <= 0x143
        table[i] = bool(first) and first not in "Ġ▁" and not remapped_byte and first.isalnum()
    return table


class MLMMasker:
    """BERT's masking for a batch of ids. Candidates are real (attention_mask 1), non-special tokens; each is
    selected with `probability` (with `continuation`/`word_starts`, whole words are selected together:
    Cui et al., 2019). Selected tokens become `mask_id` with p=0.8, a random non-special id with p=0.1, and
    stay unchanged with p=0.1; labels hold the original id at selected positions and -100 elsewhere."""

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        special_ids: Sequence[int],
        probability: float = 0.15,
        continuation: np.ndarray | None = None,
    ) -> None:
        if not 0 < probability < 1:
            raise ValueError(f"mask probability {probability} must be in (0, 1)")
        self.vocab_size, self.mask_id, self.probability = vocab_size, mask_id, probability
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[list(special_ids) + [mask_id]] = True
        self.random_ids = np.flatnonzero(~self.is_special)  # replacements are ordinary tokens
        self.continuation = continuation

    def __call__(
        self,
        input_ids: np.ndarray,
        rng: np.random.Generator,
        attention_mask: np.ndarray | None = None,
        word_starts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(masked inputs, labels) for (B, T) int64 `input_ids`; the input array is not modified."""
        candidate = ~self.is_special[input_ids]
        if attention_mask is not None:
            candidate &= attention_mask.astype(bool)
        draw = rng.random(input_ids.shape)
        if word_starts is None and self.continuation is not None:
            word_starts = ~self.continuation[input_ids]
        if word_starts is not None:  # every token of a word takes the draw of the word's first token
            starts = word_starts | ~candidate  # a special token is a word of its own...
            starts[:, 1:] |= ~candidate[:, :-1]  # ...and ends the word before the next token
            starts[:, 0] = True
            positions = np.where(starts, np.arange(input_ids.shape[1]), 0)
            first = np.maximum.accumulate(positions, axis=1)
            draw = np.take_along_axis(draw, first, axis=1)
        selected = candidate & (draw < self.probability)
        action = rng.random(input_ids.shape)
        inputs = input_ids.copy()
        inputs[selected & (action < 0.8)] = self.mask_id
        replace = selected & (action >= 0.8) & (action < 0.9)
        inputs[replace] = self.random_ids[rng.integers(0, len(self.random_ids), size=int(replace.sum()))]
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        return inputs, labels


class MLMBatches:
    """Packed blocks with BERT masking: {"input_ids", "attention_mask", "labels"} of shape (B, seq_len).
    With `cls_id`/`sep_id`, each block of seq_len - 2 tokens is wrapped as [CLS] block [SEP]."""

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        masker: MLMMasker,
        seed: int = 0,
        cls_id: int | None = None,
        sep_id: int | None = None,
        pad_id: int = 0,
        shuffle: bool = True,
        split: str = "train",
    ) -> None:
        self.wrap = cls_id is not None and sep_id is not None
        self.cls_id, self.sep_id, self.pad_id, self.masker = cls_id, sep_id, pad_id, masker
        self.seq_len = seq_len
        self.packed = PackedBatches(
            tokens, batch_size, seq_len - 2 * self.wrap, seed=seed, shuffle=shuffle, pad_id=pad_id, split=split
        )

    def __len__(self) -> int:
        return len(self.packed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seed = self.packed.cursor.seed
        for epoch, batch, rows, lengths in self.packed.epoch_blocks():
            if self.wrap:
                rows = np.concatenate([np.full((len(rows), 1), self.cls_id), rows, np.full((len(rows), 1), 0)], 1)
                rows[np.arange(len(rows)), lengths + 1] = self.sep_id
                rows[_padding(lengths + 2, self.seq_len)] = self.pad_id
                lengths = lengths + 2
            attention_mask = (~_padding(lengths, rows.shape[1])).astype(np.int64)
            inputs, labels = self.masker(rows, _rng(seed, epoch, batch, 1), attention_mask)
            yield {
                "input_ids": torch.from_numpy(inputs),
                "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels),
            }

    def state_dict(self) -> dict:
        return {**self.packed.state_dict(), "loader": "MLMBatches"}

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict({**state, "loader": "PackedBatches"})


# ------------------------------------------------------------------------------------ span corruption


def span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> tuple[int, int]:
    """(raw tokens per example, targets length) so that corrupting the raw tokens gives inputs of exactly
    `inputs_length` (T5's `random_spans_helper`; 512 -> 568 raw tokens, 114 targets)."""

    def lengths(raw: int) -> tuple[int, int]:
        noise = round(raw * noise_density)
        spans = max(1, round(noise / mean_span_length))
        return raw - noise + spans + 1, noise + spans + 1  # each span -> a sentinel; + EOS

    raw = 2
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return raw, lengths(raw)[1]


class SpanCorruptor:
    """T5 span corruption of one sequence; see the module docstring. The noise mask alternates non-noise and
    noise spans, starting with non-noise: num_noise = round(L * density), num_spans = round(num_noise / mean),
    and both totals are cut into num_spans random positive lengths."""

    def __init__(
        self,
        eos_id: int,
        sentinel_start: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        n_sentinels: int = 100,
    ) -> None:
        if not 0 < noise_density < 1:
            raise ValueError(f"noise_density {noise_density} must be in (0, 1)")
        self.eos_id, self.sentinel_start, self.n_sentinels = eos_id, sentinel_start, n_sentinels
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def noise_mask(self, length: int, rng: np.random.Generator) -> np.ndarray:
        num_noise = min(max(round(length * self.noise_density), 1), length - 1)
        num_spans = max(1, round(num_noise / self.mean_span_length))
        num_spans = min(num_spans, num_noise, length - num_noise)
        if num_spans > self.n_sentinels:
            raise ValueError(f"{num_spans} noise spans need more than the {self.n_sentinels} sentinels")

        def segment(total: int) -> np.ndarray:  # num_spans positive lengths summing to total
            cuts = np.sort(rng.choice(np.arange(1, total), size=num_spans - 1, replace=False))
            return np.diff(np.concatenate([[0], cuts, [total]]))

        spans = np.stack([segment(length - num_noise), segment(num_noise)], axis=1).reshape(-1)  # N0 X0 N1 X1 ...
        is_noise = np.tile([False, True], num_spans)
        return np.repeat(is_noise, spans)

    def __call__(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) for a 1-D array of ids."""
        noise = self.noise_mask(len(tokens), rng)
        return self._replace_spans(tokens, noise), self._replace_spans(tokens, ~noise)

    def _replace_spans(self, tokens: np.ndarray, drop: np.ndarray) -> np.ndarray:
        """Each run of `drop` tokens becomes one sentinel (numbered in order); then EOS."""
        first = drop & ~np.concatenate([[False], drop[:-1]])
        sentinels = self.sentinel_start - (np.cumsum(first) - 1)
        kept = np.where(first, sentinels, tokens)[~drop | first]
        return np.append(kept, self.eos_id)


class SpanCorruptionBatches:
    """Packed blocks of raw tokens corrupted T5-style: {"input_ids", "attention_mask", "labels"} with inputs
    padded to `inputs_length` (pad_id, mask 0) and labels to the matching targets length (-100)."""

    def __init__(
        self,
        tokens,
        batch_size: int,
        inputs_length: int,
        corruptor: SpanCorruptor,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
        split: str = "train",
    ) -> None:
        self.corruptor, self.pad_id, self.inputs_length = corruptor, pad_id, inputs_length
        raw, self.targets_length = span_corruption_lengths(
            inputs_length, corruptor.noise_density, corruptor.mean_span_length
        )
        self.packed = PackedBatches(tokens, batch_size, raw, seed=seed, shuffle=shuffle, pad_id=pad_id, split=split)

    def __len__(self) -> int:
        return len(self.packed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seed = self.packed.cursor.seed
        for epoch, batch, rows, lengths in self.packed.epoch_blocks():
            rng = _rng(seed, epoch, batch, 2)
            pairs = [self.corruptor(row[:n], rng) for row, n in zip(rows, lengths, strict=True)]
            yield _pad_pairs(pairs, self.pad_id, self.inputs_length, self.targets_length)

    def state_dict(self) -> dict:
        return {**self.packed.state_dict(), "loader": "SpanCorruptionBatches"}

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict({**state, "loader": "PackedBatches"})


# ---------------------------------------------------------------------------------------------- seq2seq


def _pad_pairs(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    source_length: int | None = None,
    target_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pads sources with pad_id (attention_mask 0) and targets with -100, to the given lengths or to
    the longest of the batch."""
    s_len = source_length or max(len(s) for s, _ in pairs)
    t_len = target_length or max(len(t) for _, t in pairs)
    input_ids = np.full((len(pairs), s_len), pad_id, dtype=np.int64)
    labels = np.full((len(pairs), t_len), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(pairs), s_len), dtype=np.int64)
    for r, (source, target) in enumerate(pairs):
        if len(source) > s_len or len(target) > t_len:
            raise ValueError(f"pair {r} ({len(source)}, {len(target)} tokens) exceeds ({s_len}, {t_len})")
        input_ids[r, : len(source)] = source
        attention_mask[r, : len(source)] = 1
        labels[r, : len(target)] = target
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


class Seq2SeqBatches:
    """Batches of (source ids, target ids) pairs, shuffled per epoch, padded to the batch's longest:
    {"input_ids", "attention_mask", "labels"} (labels padded with -100; the model builds decoder inputs)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.pairs, self.pad_id = pairs, pad_id
        self.cursor = EpochCursor(len(pairs), batch_size, seed, shuffle, drop_last)

    def __len__(self) -> int:
        return len(self.cursor)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _, _, indices in self.cursor.epoch_batches():
            yield _pad_pairs([self.pairs[int(i)] for i in indices], self.pad_id)

    def state_dict(self) -> dict:
        c = self.cursor
        return {"loader": "Seq2SeqBatches", **c.state_dict(), "batch_size": c.batch_size, "seed": c.seed,
                "pairs": len(self.pairs)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        c = self.cursor
        check_state(state, {"loader": "Seq2SeqBatches", "batch_size": c.batch_size, "seed": c.seed,
                             "pairs": len(self.pairs)})  # fmt: skip
        c.load_state_dict(state)
