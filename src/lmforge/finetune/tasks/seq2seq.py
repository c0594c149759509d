"""Sequence to sequence (translation): an encoder-decoder reads the source and writes the target.

Records are (source, target) pairs, `data.prefix` put before every source: the catalog's translation sets
(kjv-spanish; `data.source_field`, `data.target_field` name the languages) or a user's TSV (source<TAB>target)
or JSONL file (those two fields). Prediction inputs are JSONL objects or CSV rows with the source under
`data.source_field` (the field the model was trained with) or "source", or lines of text. No pretrained
encoder-decoder ships offline, so the default model is the transformer-tiny preset (random weights).

Loss: cross-entropy per target token, teacher forcing. Final scores: beam search (`task.num_beams`) outputs
against the targets (`lmforge.finetune.tasks.generation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmforge.finetune.tasks.base import batched, field_of, needs
from lmforge.finetune.tasks.generation import GenerationTask

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig


class Seq2SeqTask(GenerationTask):
    name = "seq2seq"
    head = "seq2seq_lm"
    default_model = "transformer-tiny"

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return kind == "translation"

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        data = config.data
        return [(data.prefix + r[data.source_field], r[data.target_field]) for r in rows]

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        data = config.data
        if path.suffix in (".tsv", ".txt"):
            from lmforge.data.readers.records import read_parallel_tsv

            return [(data.prefix + p.source, p.target) for p in read_parallel_tsv(path)]
        from lmforge.data.readers.records import iter_jsonl

        pairs = []
        for line, record in iter_jsonl(path):
            if data.source_field not in record or data.target_field not in record:
                raise ValueError(
                    f"{path}:{line}: needs fields {data.source_field!r} and {data.target_field!r} "
                    "(set data.source_field / data.target_field)"
                )
            pairs.append((data.prefix + str(record[data.source_field]), str(record[data.target_field])))
        return pairs

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return [s + "\n" + t for s, t in records]

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_seq2seq

        d = self.config.data
        features, stats = encode_seq2seq(self.tokenizer, records, d.max_length, d.max_target_length)
        self.stats[f"{split}_truncated"] = int(stats.get("truncated", 0))
        return features

    def reference(self, record: tuple[str, str]) -> str:
        return record[1]

    def generate(self, model: nn.Module, records: list) -> list[str]:
        """Beam search from each source (cut to data.max_length - 1 tokens, then eos), right-padded in batches."""
        from lmforge.generate import generate

        tok, device = self.tokenizer, next(model.parameters()).device
        eos, pad = tok.eos_token_id, self.pad_id
        out: list[str] = []
        model.eval()
        with self.progress("generating", len(records)) as bar:
            for chunk in batched(records, self.config.task.predict_batch_size):
                rows = [
                    ids[: self.config.data.max_length - 1] + ([eos] if eos is not None else [])
                    for ids in tok.encode_batch([s for s, _ in chunk], add_special_tokens=False)["input_ids"]
                ]
                input_ids = torch.full((len(rows), max(map(len, rows))), pad, device=device)
                mask = torch.zeros_like(input_ids)
                for i, row in enumerate(rows):
                    input_ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                result = generate(
                    model,
                    input_ids,
                    mask,
                    max_new_tokens=self.config.task.max_new_tokens,
                    num_beams=self.config.task.num_beams,
                )
                for row in result.tokens.tolist():
                    out.append(tok.decode([t for t in row if t not in (eos, pad)], skip_special_tokens=True).strip())
                bar.advance(len(chunk))
        model.train()
        return out

    def shown_input(self, record: tuple[str, str]) -> dict[str, str]:
        """The source as the user wrote it (without `data.prefix`), under the trained source field."""
        source, prefix = record[0], self.config.data.prefix
        return {self.config.data.source_field: source[len(prefix) :] if source.startswith(prefix) else source}

    def input_record(self, row: dict | str, number: int) -> tuple[str, str]:
        """The source under data.source_field (the field the model was trained with) or "source", or a line of
        text; `data.prefix` goes before it, as in training."""
        field = self.config.data.source_field
        source = field_of(row, field, "source")
        if not isinstance(source, str):
            raise ValueError(needs(field, "source"))
        return (self.config.data.prefix + source, "")
