"""Padded tensor batches of fine-tuning features (`lmforge.finetune.features` / `.qa`), resumable.

`collate` pads a list of features to the longest row: input_ids with the pad id (attention_mask 0 there),
token_type_ids with 0, sequence labels with -100 (ignored by every loss); scalar labels (class ids),
multi-hot labels and QA start/end positions are stacked. Keys that only map predictions back to the
input (word_ids, offsets, example_index, n_words) stay in the features, not in the batch, so a batch can
be passed to `model(**batch)` as it is.

`FeatureBatches` shuffles per epoch with (seed, epoch) and saves its position like the pretraining loaders
(`lmforge.data.pipeline.loaders`), so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.data.pipeline.loaders import EpochCursor, check_state
from lmforge.finetune.features import Feature
from lmforge.nn.loss import IGNORE_INDEX

PADDED = {"input_ids": None, "token_type_ids": 0}  # key -> pad value (None: the pad id); labels handled apart
STACKED = ("start_positions", "end_positions")


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _labels(values: list) -> torch.Tensor:
    """(B,) class ids, (B, n_labels) float multi-hot targets, or (B, T) token labels padded with -100."""
    if all(isinstance(v, int) for v in values):
        return torch.tensor(values, dtype=torch.long)
    if all(isinstance(v, (list, tuple)) and all(isinstance(x, float) for x in v) for v in values):
        return torch.tensor(values, dtype=torch.float)
    return _pad(values, IGNORE_INDEX)


def collate(features: Sequence[Feature], pad_id: int | None) -> dict[str, torch.Tensor]:
    """One right-padded batch {"input_ids", "attention_mask", ("token_type_ids"), ("labels"),
    ("start_positions", "end_positions")} from features that all have the same keys."""
    if not features:
        raise ValueError("cannot collate an empty list of features")
    if pad_id is None:
        raise ValueError("pad_id is None: this tokenizer has no pad token; set one, e.g. tok.pad_token = tok.eos_token")
    keys = set(features[0])
    for i, feature in enumerate(features):
        if set(feature) != keys:
            raise ValueError(
                f"feature {i} has keys {sorted(feature)} but feature 0 has {sorted(keys)}; "
                "collate features made by one encoder"
            )
    batch = {"input_ids": _pad([f["input_ids"] for f in features], pad_id)}
    batch["attention_mask"] = _pad([[1] * len(f["input_ids"]) for f in features], 0)
    for key, value in PADDED.items():
        if key in keys and value is not None:
            batch[key] = _pad([f[key] for f in features], value)
    if "labels" in keys:
        batch["labels"] = _labels([f["labels"] for f in features])
    for key in STACKED:
        if key in keys:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
    return batch


class FeatureBatches:
    """Epochs of padded batches over `features`: a new order each epoch from (seed, epoch) (or the given
    order with shuffle=False), each feature exactly once per epoch (the last batch short unless drop_last).

    Iterating yields the rest of the current epoch; the next iteration starts the next epoch (wrap in
    `lmforge.train.data.Endless` for an infinite stream). `state_dict()` -> {"epoch", "position" (batches
    of the epoch already yielded), ...}; `load_state_dict` continues from there."""

    def __init__(
        self,
        features: Sequence[Feature],
        batch_size: int,
        *,
        pad_id: int | None,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if pad_id is None:
            raise ValueError(
                "pad_id is None: this tokenizer has no pad token; set one, e.g. tok.pad_token = tok.eos_token"
            )
        self.features, self.pad_id = features, pad_id
        self.cursor = EpochCursor(len(features), batch_size, seed, shuffle, drop_last)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.cursor)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _, _, indices in self.cursor.epoch_batches():
            yield collate([self.features[int(i)] for i in indices], self.pad_id)

    def _settings(self) -> dict:
        c = self.cursor
        return {"loader": "FeatureBatches", "batch_size": c.batch_size, "seed": c.seed, "features": len(self.features),
                "shuffle": c.shuffle, "drop_last": c.drop_last}  # fmt: skip

    def state_dict(self) -> dict:
        return {"epoch": self.cursor.epoch, "position": self.cursor.batch, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self._settings())
        self.cursor.load_state_dict({"epoch": state["epoch"], "batch": state["position"]})
