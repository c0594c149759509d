"""`Subject`: one model, one input and the one number every method explains.

Every method attributes the same scalar, the *explained score*: the logit (before the softmax) of the target at
the read-out position,

    sequence classifier   logits[target]                       (BERT/RoBERTa read [CLS], decoders the last token)
    token classifier      logits[position, target]             (the token at `position`)
    causal LM             logits[T - 1, target]                (the next token after the input)

The logit rather than the probability keeps integrated gradients' completeness check about one function of the
input, not a softmax over competitors (Sundararajan et al., 2017, sec. 3). The baseline input for IG and
occlusion keeps the special tokens ([CLS], [SEP], ...) and puts the pad token (else unk, else eos) everywhere
else, as Captum's BERT tutorial does: "no content" at each position, same length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

KINDS = ("sequence_classification", "token_classification", "causal_lm")
ENCODER_FAMILIES = ("bert", "roberta")  # read a sequence from its first token ([CLS] / <s>)


@dataclass
class Subject:
    """A model in eval mode, its tokenizer, one tokenised input (1, T) and what is explained about it."""

    model: nn.Module
    tokenizer: object
    input_ids: torch.Tensor  # (1, T)
    tokens: list[str]
    kind: str
    target: int  # class id, or token id for a causal LM
    target_name: str
    position: int  # the read-out position of the explained score
    labels: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    position_ids: torch.Tensor | None = None  # (1, T) of the real input, kept for every variant of it

    def __post_init__(self) -> None:
        # RoBERTa numbers positions from the ids (pads get the pad position): the baseline and occluded inputs
        # must keep the real input's positions, or they would differ from it in more than their tokens.
        if self.position_ids is None and hasattr(self.model, "default_position_ids"):
            self.position_ids = self.model.default_position_ids(self.input_ids)

    @property
    def config(self):
        return self.model.config

    def inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of ids (B, T) without padding: every position is attended."""
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids.expand(ids.shape[0], -1)
        return inputs

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(**self.inputs(ids)).logits

    def score(self, ids: torch.Tensor) -> torch.Tensor:
        """The explained score of each row of ids (B, T) -> (B,)."""
        return self.read(self.logits(ids))

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        """The explained score from a batch of logits: (B, labels) or (B, T, labels or vocab) -> (B,)."""
        if logits.dim() == 2:
            return logits[:, self.target]
        return logits[:, self.position, self.target]

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """softmax probability of the target at the read-out position, (B,): what deletion curves follow."""
        logits = self.logits(ids)
        logits = logits if logits.dim() == 2 else logits[:, self.position]
        return torch.softmax(logits.float(), dim=-1)[:, self.target]

    def special_mask(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """True at special tokens ([CLS], [SEP], <s>, ...), (T,)."""
        ids = self.input_ids[0] if ids is None else ids
        special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=ids.dtype)
        return torch.isin(ids, special)

    def baseline_id(self) -> int:
        tok = self.tokenizer
        for value in (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def baseline_ids(self) -> torch.Tensor:
        """The input with every non-special token replaced by the baseline token (1, T)."""
        return torch.where(
            self.special_mask()[None], self.input_ids, torch.full_like(self.input_ids, self.baseline_id())
        )


# ------------------------------------------------------------------------------------------ building one


def head_kind(model: nn.Module, name: str) -> str:
    """The model's head, refused (one line) unless explain covers it."""
    head = getattr(model.config, "head", "none")
    if head not in KINDS:
        raise ValueError(
            f"{name} has head {head!r}; explain covers {', '.join(KINDS)} models (a seq2seq or headless model has "
            "no single score to attribute)"
        )
    return head


def label_names(folder: Path | None, num_labels: int) -> list[str]:
    """The labels of a classifier: a fine-tuned folder's task.json, else a Hugging Face config's id2label, else
    "0", "1", ..."""
    if folder is not None and folder.is_dir():
        task = folder / "task.json"
        if task.is_file():
            labels = json.loads(task.read_text(encoding="utf-8")).get("labels")
            if isinstance(labels, list) and len(labels) == num_labels:
                return [str(label) for label in labels]
        config = folder / "config.json"
        if config.is_file():
            id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label")
            if isinstance(id2label, dict) and len(id2label) == num_labels:
                return [str(id2label.get(str(i), i)) for i in range(num_labels)]
    return [str(i) for i in range(num_labels)]


def context_limit(model: nn.Module) -> int | None:
    """Tokens the model can read: max_seq_len, less RoBERTa's reserved positions (pad + 1 before the first);
    None for a recurrent model, which reads any length."""
    config = model.config
    limit = getattr(config, "max_seq_len", None)
    if limit is None:
        return None
    if config.family == "roberta":
        limit -= config.pad_token_id + 1
    return limit


def encode(tokenizer, text: str, limit: int | None) -> tuple[list[int], str | None]:
    """Token ids of `text` (with the tokenizer's special tokens), truncated to `limit` (None: no limit); the note
    says so."""
    full = tokenizer.encode_batch([text])["input_ids"][0]
    if not full:
        raise ValueError("the input is empty after tokenisation; give some text")
    if limit is None or len(full) <= limit:
        return full, None
    ids = tokenizer.encode_batch([text], truncation=True, max_length=limit)["input_ids"][0]
    return ids, f"the input has {len(full)} tokens, more than the model's context of {limit}: truncated to {len(ids)}"


def resolve_target(
    kind: str, target: str | None, labels: list[str] | None, tokenizer, predicted: int
) -> tuple[int, str]:
    """(id, name) of the target: a label name or index of a classifier, a single token of a causal LM, or
    the model's own prediction when none is given."""
    if kind == "causal_lm":
        if target is None:
            return predicted, tokenizer.decode([predicted])
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"--target {target!r} is {len(ids)} tokens for this tokenizer; a causal LM's target is one token "
                f"(e.g. {tokenizer.decode(ids[:1])!r})"
            )
        return ids[0], target
    if target is None:
        return predicted, labels[predicted]
    if target in labels:
        return labels.index(target), target
    if target.isdigit() and int(target) < len(labels):
        return int(target), labels[int(target)]
    raise ValueError(f"--target {target!r} is not a label of this model; its labels are {labels}")


def build_subject(
    model: nn.Module,
    tokenizer,
    text: str,
    target: str | None = None,
    position: int | None = None,
    folder: Path | None = None,
    name: str = "the model",
) -> Subject:
    """The subject of one explanation: `text` tokenised (truncated to the context, noted), the target resolved
    (see `resolve_target`), the read-out position chosen (`position` for a token classifier: default the
    first non-special token)."""
    kind = head_kind(model, name)
    ids, note = encode(tokenizer, text, context_limit(model))
    input_ids = torch.tensor([ids], dtype=torch.long)
    tokens = [tokenizer.decode([i]) for i in ids]
    labels = label_names(folder, model.config.num_labels) if kind != "causal_lm" else None
    T = len(ids)
    if kind == "token_classification":
        special = torch.isin(input_ids[0], torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long))
        first = int((~special).nonzero()[0]) if (~special).any() else 0
        read_at = first if position is None else position
        if not 0 <= read_at < T:
            raise ValueError(f"--position {position} is outside the input's {T} tokens (0 .. {T - 1})")
    else:
        if position is not None:
            raise ValueError(f"--position applies to token classifiers; this model is a {kind.replace('_', ' ')}")
        encoder = model.config.family in ENCODER_FAMILIES and kind == "sequence_classification"
        read_at = 0 if encoder else T - 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    row = logits[0] if logits.dim() == 2 else logits[0, read_at]
    target_id, target_name = resolve_target(kind, target, labels, tokenizer, int(row.argmax()))
    return Subject(
        model=model,
        tokenizer=tokenizer,
        input_ids=input_ids,
        tokens=tokens,
        kind=kind,
        target=target_id,
        target_name=target_name,
        position=read_at,
        labels=labels,
        notes=[note] if note else [],
    )
