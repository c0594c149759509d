"""Tiny saved models with tokenizers, one per family and head, for the explain tests."""

from __future__ import annotations

import json

import pytest
import torch

TEXTS = [
    "the film was good and the actors were great",
    "a dull story with a weak plot",
    "this was a lovely and moving film",
    "boring actors and an awful plot",
    "the capital of france is paris",
]
PLANS = {  # family -> (tokenizer kind, special tokens)
    "bert": ("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
    "roberta": ("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
    "gpt": ("bpe", ["<pad>", "<s>", "</s>", "<unk>"]),
    "llama": ("bpe", ["<pad>", "<s>", "</s>", "<unk>"]),
    "lstm": ("bpe", ["<pad>", "<s>", "</s>", "<unk>"]),
}


def save_tiny(folder, preset: str, head: str, labels: list[str] | None = None, max_seq_len: int = 32, seed: int = 0):
    """A `preset` model with `head` and a tokenizer learned on TEXTS, saved in lmforge's format at `folder`
    (with a task.json naming `labels` for a classifier); returns (model, tokenizer)."""
    from lmforge import build_model
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.data.tokenizers.train import save_tokenizer, train_tokenizer
    from lmforge.hf.save import save_model
    from lmforge.models import PRESETS

    family = PRESETS[preset][0]
    kind, specials = PLANS[family]
    save_tokenizer(
        train_tokenizer(TEXTS, kind=kind, vocab_size=100, special_tokens=specials, min_frequency=1),
        folder / "tok",
        kind,
        specials,
    )
    tokenizer = load_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    values = {"vocab_size": tokenizer.vocab_size, "max_seq_len": max_seq_len, "pad_token_id": tokenizer.pad_token_id}
    if family == "roberta":
        values["max_seq_len"] = max_seq_len + tokenizer.pad_token_id + 1
    if family == "lstm":  # a recurrent model reads any length
        del values["max_seq_len"]
    if labels:
        values["num_labels"] = len(labels)
    model = build_model(preset, head=head, n_layer=2, dropout=0.0, **values).eval()
    with torch.no_grad():  # random init leaves biases and norm gains at 0/1: nudge so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, folder / "model", tokenizer=tokenizer)
    if labels:
        (folder / "model" / "task.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(preset, head) -> (model, tokenizer, saved folder), built once per session."""
    made = {}

    def get(preset: str, head: str):
        key = (preset, head)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{preset}-{head}")
            labels = None if head == "causal_lm" else ["negative", "positive", "neutral"]
            made[key] = (*save_tiny(folder, preset, head, labels), folder / "model")
        return made[key]

    return get
