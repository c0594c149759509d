"""Language modelling on plain text: continue training a causal LM on your own text (domain adaptation), or
distil one causal LM into another on it (`lmforge distill --task lm`).

Records are documents (str): a catalog text set's documents (`lmforge data list`, kind "text": shakespeare,
shakespeare-small, wikipedia-sample), a .txt file (one document; blank lines stay text), or a .jsonl file
of {"text": ...} objects (one document each). Prediction inputs are prompts, continued greedily.

Encoding follows the usual causal-LM recipe (Hugging Face's run_clm, nanoGPT's data loader): every document is
tokenized, followed by the tokenizer's end-of-text token where it has one, the token streams are concatenated
and cut into blocks of data.max_length tokens, so no position is padding and documents never straddle an
unmarked boundary. The last block keeps the remainder (at least 2 tokens) rather than dropping it, so a small
validation set is scored to its end. Each position t of a block predicts token t + 1 of the same block:

    loss = -(1/N) sum_blocks sum_{t < len - 1} log p(x_{t+1} | x_{<=t}),   perplexity = exp(loss)

where N counts those predicted tokens. (The first token of a block has no context inside the block, as in
run_clm; a sliding window with overlap would score it with context at the cost of more forward passes.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.finetune.tasks.base import batched, field_of
from lmforge.finetune.tasks.generation import GenerationTask
from lmforge.nn.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig


class LanguageModelTask(GenerationTask):
    name = "lm"
    head = "causal_lm"
    default_model = "SmolLM2-135M-Instruct"
    feature_unit = "blocks"
    record_unit = "documents"

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return kind == "text"

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        return [row for row in rows if isinstance(row, str) and row.strip()]

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        """A .jsonl file: one {"text": ...} document a line; any other file: one UTF-8 text document."""
        from lmforge.data.readers.records import DataFormatError, iter_jsonl, iter_lines

        if path.suffix == ".jsonl":
            documents = []
            for line, row in iter_jsonl(path):
                text = row.get("text")
                if not isinstance(text, str):
                    raise DataFormatError(path, line, 'needs a "text" string (one document a line)')
                documents.append(text)
        else:
            documents = ["".join(line for _, line in iter_lines(path))]
        documents = [d for d in documents if d.strip()]
        if not documents:
            raise ValueError(f'{path} holds no text; pass a UTF-8 text file or a .jsonl file of {{"text": ...}}')
        return documents

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return list(records)

    def encode(self, records: list, split: str) -> list[dict]:
        """Blocks of data.max_length tokens over the documents' concatenated token streams (module docstring)."""
        size = self.config.data.max_length
        if size < 2:
            raise ValueError(f"data.max_length={size}: a language-model block needs at least 2 tokens")
        eos = self.tokenizer.eos_token_id
        stream: list[int] = []
        for document in records:
            stream += self.tokenizer.encode(document, add_special_tokens=False)
            if eos is not None:
                stream.append(eos)
        blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
        blocks = [b for b in blocks if len(b) >= 2]
        if not blocks:
            raise ValueError(
                f"the {split} text holds {len(stream)} token(s): too few for one block of at least 2; give it more text"
            )
        self.stats[f"{split}_documents"] = len(records)
        self.stats[f"{split}_tokens"] = len(stream)
        self.stats[f"{split}_blocks"] = len(blocks)
        return [{"input_ids": block, "labels": block} for block in blocks]

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1

    def evaluate(self, model: nn.Module, records: list, features: list[dict], final: bool = True) -> tuple[dict, dict]:
        """Loss and perplexity over every block (no sampling: the whole set is scored, also when final)."""
        loss = self.eval_loss(model, features)
        tokens = sum(len(f["input_ids"]) - 1 for f in features)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens_scored": tokens}, {}

    def reference(self, record: str) -> str:
        return record

    def generate(self, model: nn.Module, records: list) -> list[str]:
        """Greedy continuations of each prompt (its last data.max_length - 1 tokens), left-padded in batches."""
        from lmforge.generate import generate

        device = next(model.parameters()).device
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        out: list[str] = []
        model.eval()
        with self.progress("generating", len(records)) as bar:
            for chunk in batched(records, self.config.task.predict_batch_size):
                rows = [
                    self.tokenizer.encode(text, add_special_tokens=False)[-(self.config.data.max_length - 1) :]
                    for text in chunk
                ]
                rows = [r or ([eos[0]] if eos else [self.pad_id]) for r in rows]  # an empty prompt: start a text
                width = max(map(len, rows))
                input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                result = generate(
                    model, input_ids, mask, max_new_tokens=self.config.task.max_new_tokens, eos_token_id=eos
                )
                for row in result.tokens.tolist():
                    out.append(self.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True))
                bar.advance(len(chunk))
        model.train()
        return out

    def shown_input(self, record: str) -> dict[str, str]:
        return {"prompt": record}

    def input_record(self, row: dict | str, number: int) -> str:
        """{"prompt": ...} / {"text": ...} or a line of text: the prompt to continue."""
        prompt = field_of(row, "prompt", "text")
        if not isinstance(prompt, str):
            raise ValueError("needs a 'prompt' string")
        return prompt
