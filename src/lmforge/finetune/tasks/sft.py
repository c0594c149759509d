"""Supervised fine-tuning of a chat model: learn the assistant's reply to a conversation.

Records are `InstructionExample`s (the last message is the reply learned): a user's JSONL file (alpaca or chat
format), or a catalog set turned into instructions, so a chat model can be taught a new behaviour from real data
and scored on held-out items. A classification set becomes "Classify the sentiment of this text as positive or
negative. ... Text: ..." -> <label>; a translation set becomes "Translate from English to Spanish: ..." ->
<target>. Prediction inputs are {"prompt": ...} objects or lines of text.

Conversations are rendered with the tokenizer's chat template (a default one when it has none, saved with the
model so chat and serve prompt it the same way). Loss: cross-entropy per response token; prompt tokens are
context, never targets. Final scores: greedy replies against the references (`lmforge.finetune.tasks.generation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.readers.records import InstructionExample, Message
from lmforge.finetune.tasks.base import batched, field_of
from lmforge.finetune.tasks.generation import GenerationTask
from lmforge.nn.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from lmforge.data.tokenizers.tokenizer import Tokenizer
    from lmforge.finetune.config import FinetuneConfig, FTDataSection

LANGUAGES = {"en": "English", "es": "Spanish"}


def _conversation(prompt: str, answer: str) -> InstructionExample:
    return InstructionExample((Message("user", prompt), Message("assistant", answer)))


def instructions_from_records(
    rows: list[dict], kind: str, labels: tuple[str, ...], data: FTDataSection
) -> list[InstructionExample]:
    """Instruction conversations over a catalog set: classification -> answer with the label; translation ->
    answer with the target sentence."""
    conversations = []
    if kind == "classification":
        choices = " or ".join(labels)
        for r in rows:
            prompt = (
                f"Classify the sentiment of this text as {choices}. Answer with one word.\n\nText: {r['text'].strip()}"
            )
            conversations.append(_conversation(prompt, str(r["label"])))
    else:
        source = LANGUAGES.get(data.source_field, data.source_field)
        target = LANGUAGES.get(data.target_field, data.target_field)
        for r in rows:
            prompt = f"Translate from {source} to {target}: {r[data.source_field]}"
            conversations.append(_conversation(prompt, r[data.target_field]))
    return conversations


class SFTTask(GenerationTask):
    name = "sft"
    head = "causal_lm"
    default_model = "SmolLM2-135M-Instruct"

    @classmethod
    def reads_catalog(cls, name: str, kind: str) -> bool:
        return kind in ("classification", "translation")

    @classmethod
    def catalog_records(cls, name: str, dataset: Any, split: str, rows: list, config: FinetuneConfig) -> list:
        return instructions_from_records(rows, dataset.kind, dataset.labels, config.data)

    @classmethod
    def read_file(cls, path: Path, config: FinetuneConfig) -> list:
        from lmforge.data.readers.records import read_instructions

        return list(read_instructions(path))

    @classmethod
    def texts(cls, records: list) -> list[str]:
        return ["\n".join(m.content for m in r.messages) for r in records]

    def saved_tokenizer(self) -> Tokenizer:
        """The tokenizer with the chat template the model learned, so chat/serve prompt it the same way."""
        from lmforge.finetune.features import chat_renderer

        return chat_renderer(self.tokenizer)

    def encode(self, records: list, split: str) -> list[dict]:
        from lmforge.finetune.features import encode_sft

        features, stats = encode_sft(self.tokenizer, records, self.config.data.max_length)
        for key, value in stats.items():
            if isinstance(value, int):
                self.stats[f"{split}_{key}"] = value
        return features

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # position t predicts token t + 1

    def reference(self, record: InstructionExample) -> str:
        return record.messages[-1].content

    def generate(self, model: nn.Module, records: list) -> list[str]:
        """Greedy responses to each conversation's prompt (every message but the last), rendered with the same
        chat template as training, left-padded in batches."""
        from lmforge.finetune.features import chat_renderer
        from lmforge.generate import generate

        renderer, device = chat_renderer(self.tokenizer), next(model.parameters()).device
        out: list[str] = []
        model.eval()
        with self.progress("generating", len(records)) as bar:
            for chunk in batched(records, self.config.task.predict_batch_size):
                rows = []
                for r in chunk:
                    messages = [{"role": m.role, "content": m.content} for m in r.messages[:-1]]
                    text = renderer.apply_chat_template(messages, add_generation_prompt=True)
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                    rows.append(ids[-(self.config.data.max_length - 1) :])  # keep the end: the question is there
                width = max(map(len, rows))
                input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                configured = getattr(model.config, "eos_token_id", None)
                configured = [] if configured is None else [configured] if isinstance(configured, int) else configured
                eos = sorted(
                    {*configured, *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])}
                )
                result = generate(
                    model, input_ids, mask, max_new_tokens=self.config.task.max_new_tokens, eos_token_id=eos
                )
                specials = set(
                    self.tokenizer.all_special_ids
                )  # the turn's end token (the tokenizer's eos) ends a reply
                for row in result.tokens.tolist():
                    out.append(
                        self.tokenizer.decode([t for t in row if t not in specials], skip_special_tokens=True).strip()
                    )
                bar.advance(len(chunk))
        model.train()
        return out

    def shown_input(self, record: InstructionExample) -> dict[str, str]:
        return {"prompt": record.messages[-2].content if len(record.messages) > 1 else ""}

    def input_record(self, row: dict | str, number: int) -> InstructionExample:
        """{"prompt": ...} or a line of text: one user message, the reply to be generated."""
        prompt = field_of(row, "prompt")
        if not isinstance(prompt, str):
            raise ValueError("needs a 'prompt' string")
        return _conversation(prompt, "")
