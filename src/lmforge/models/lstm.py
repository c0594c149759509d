"""Recurrent baselines: an embedding, stacked (bi)directional LSTM or GRU layers, pooling, a classifier.

    x_t = E[token_t]                                                     (then dropout)
    LSTM (Hochreiter & Schmidhuber, 1997; the form of torch.nn.LSTM):
        i, f, g, o = sigma(W_i x + U_i h + b_i), sigma(...f), tanh(...g), sigma(...o)
        c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)
    GRU (Cho et al., 2014): r, z = sigma(...), n = tanh(W_n x + r * (U_n h + b_n)),  h_t = (1 - z) * n + z * h_{t-1}
    bidirectional (Schuster & Paliwal, 1997): a second stack reads right to left, h_t = [h_t^fwd ; h_t^bwd]

The recurrences are `torch.nn.LSTM` / `torch.nn.GRU` (cuDNN on a GPU); what this file adds is the padding
discipline: a batch is packed (`pack_padded_sequence`) by the lengths its attention mask gives, so a pad
never enters a state, and a sentence gets the same output in any batch, padded to any length. Pooling
turns the states of a sentence of n real tokens into one vector:
- last: the final state of the top layer, h_n (forward) and, bidirectional, the backward stack's state after
  reading back to the first token: [h_n^fwd ; h_1^bwd]. This is what a Keras LSTM without
  return_sequences returns.
- mean: (1/n) sum_{t<=n} h_t;  max: max_{t<=n} h_t per feature (pads excluded from both).
Heads: sequence_classification puts a linear layer on the pooled vector; token_classification on every h_t.
Inputs are right-padded (as `lmforge.finetune.batches` pads them).

The `lstm-seed` preset mirrors the seed's Keras sentiment model: Embedding -> LSTM(return_sequences=True)
-> LSTM -> Dense(1, sigmoid). Our head is a 2-way softmax instead of one sigmoid unit: with logits
(a, b), softmax(.)_1 = sigma(b - a), the same family of functions, and the cross-entropy of the two-way
softmax equals the binary cross-entropy of sigma(b - a), so both models fit the same classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmforge.models.config import ModelConfig, check_choice, check_fraction, check_positive
from lmforge.models.heads import ClassifierHead, head_loss
from lmforge.models.output import ModelOutput
from lmforge.nn import TokenEmbedding

RNN_HEADS = ("none", "sequence_classification", "token_classification")
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "mean", "max")


@dataclass
class LSTMConfig(ModelConfig):
    family: ClassVar[str] = "lstm"
    allowed_heads: ClassVar[tuple[str, ...]] = RNN_HEADS

    vocab_size: int = 20000
    d_model: int = 128  # embedding width
    hidden_size: int = 128  # state width per direction
    n_layer: int = 2
    bidirectional: bool = False
    pooling: str = "last"
    cell: str = "lstm"
    dropout: float = 0.1  # embeddings, between recurrent layers, and the classifier input
    pad_token_id: int = 0

    def validate(self) -> None:
        check_positive(self, "vocab_size", "d_model", "hidden_size", "n_layer")
        check_fraction(self, "dropout")
        check_choice(self, "pooling", POOLINGS)
        check_choice(self, "cell", tuple(CELLS))
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be a token id in [0, {self.vocab_size})")

    @property
    def output_size(self) -> int:
        return self.hidden_size * (2 if self.bidirectional else 1)


@dataclass
class GRUConfig(LSTMConfig):
    """The same network with GRU cells (fewer gates, no cell state)."""

    family: ClassVar[str] = "gru"

    cell: str = "gru"


class RNNClassifier(nn.Module):
    """Embedding -> stacked (bi)LSTM/GRU over packed sequences -> pooling -> head."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = TokenEmbedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id)
        self.drop = nn.Dropout(c.dropout)
        self.rnn = CELLS[c.cell](
            c.d_model,
            c.hidden_size,
            num_layers=c.n_layer,
            batch_first=True,
            bidirectional=c.bidirectional,
            dropout=c.dropout if c.n_layer > 1 else 0.0,  # torch applies it between layers only
        )
        self.classifier = ClassifierHead(c.output_size, c.num_labels, dropout=c.dropout) if c.head != "none" else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T), right-padded; attention_mask (B, T), 1 = real token (default: all real)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        lengths = mask.sum(-1).clamp(min=1)  # an empty row reads one pad rather than break the packing
        x = self.drop(self.tok_emb(input_ids))  # (B, T, d_model)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, H * dirs), zeros at pads
        h_n = state[0] if isinstance(state, tuple) else state  # (n_layer * dirs, B, H), LSTM's state is (h, c)
        pooled = self.pool(h, h_n, mask)  # (B, H * dirs)

        logits = None
        if self.config.head == "sequence_classification":
            logits = self.classifier(pooled)  # (B, num_labels)
        elif self.config.head == "token_classification":
            logits = self.classifier(h)  # (B, T, num_labels)
        return ModelOutput(
            logits=logits,
            loss=head_loss(self.config.head, logits, labels),
            last_hidden_state=h,
            pooler_output=pooled,
        )

    def pool(self, h: torch.Tensor, h_n: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per sentence from its states h (B, T, D) and final states h_n (see the module docstring)."""
        pooling = self.config.pooling
        if pooling == "last":  # packing makes h_n the state at each row's own last real token
            directions = 2 if self.config.bidirectional else 1
            return torch.cat(list(h_n[-directions:]), dim=-1)  # the top layer's directions
        keep = mask[..., None]  # (B, T, 1)
        if pooling == "mean":
            return (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return h.masked_fill(~keep, torch.finfo(h.dtype).min).amax(1)
