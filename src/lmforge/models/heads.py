"""Task heads and their losses, shared by all families.

A head maps hidden states to logits; pooling (which token stands for the sequence) is done by the model
file, where a reader can see it; `head_loss` turns logits and labels into the training loss.

- causal_lm: logits_t = W h_t predicts token t+1; loss = CE(logits[:, :-1], labels[:, 1:]) (labels are the
  input ids; the shift happens here, as in Hugging Face).
- masked_lm (BERT): logits = LayerNorm(GELU(W h + b)) E^T + b_vocab, with E the (tied) token embedding.
- seq2seq_lm: decoder logits against already-shifted targets (labels[t] is the token after decoder input t).
- sequence_classification: one vector per sequence -> num_labels logits. num_labels == 1 is regression
  (MSE); float labels of shape (B, num_labels) are multi-label (BCE); integer labels single-label (CE).
- token_classification: a label per token (CE).
- question_answering: two logits per token (answer start, answer end); labels (B, 2) = [start, end].
Label value -100 is ignored everywhere, the convention data collators use for padding. Token-level losses
use `lmforge.nn.loss.cross_entropy` (same values as F.cross_entropy, less memory traffic over the vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.loss import IGNORE_INDEX, cross_entropy
from lmforge.nn.mlp import get_activation
from lmforge.nn.norm import LayerNorm


class MaskedLMHead(nn.Module):
    """BERT's transform (dense, activation, LayerNorm) then a decoder tied to the token embedding."""

    def __init__(self, d_model: int, vocab_size: int, activation: str = "gelu", eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.act = get_activation(activation)
        self.norm = LayerNorm(d_model, eps)
        self.decoder = nn.Linear(d_model, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class ClassifierHead(nn.Module):
    """dropout -> [dense -> tanh -> dropout] -> linear. The hidden layer is RoBERTa's classification head;
        BERT instead feeds its pooler output straight to the final linear (hidden=False). Decoders classify
    from the last token with a bias-free linear, as GPT-2 and Llama checkpoints do."""

    def __init__(
        self, d_model: int, num_labels: int, dropout: float = 0.0, hidden: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.dense = nn.Linear(d_model, d_model) if hidden else None
        self.out = nn.Linear(d_model, num_labels, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.drop(h)
        if self.dense is not None:
            h = self.drop(torch.tanh(self.dense(h)))
        return self.out(h)


DECODER_HEADS = ("none", "causal_lm", "sequence_classification", "token_classification", "question_answering")


def build_decoder_heads(config) -> tuple[nn.Linear | None, ClassifierHead | None]:
    """(lm_head, classifier) of a decoder-only model for `config.head` (GPT-2 and Llama share them):
    a bias-free vocabulary projection, a bias-free linear on the last token, or a per-token linear."""
    c = config
    if c.head == "causal_lm":
        return nn.Linear(c.d_model, c.vocab_size, bias=False), None
    if c.head == "sequence_classification":
        return None, ClassifierHead(c.d_model, c.num_labels, bias=False)
    if c.head == "token_classification":
        return None, ClassifierHead(c.d_model, c.num_labels, dropout=c.dropout)
    if c.head == "question_answering":
        return None, ClassifierHead(c.d_model, 2)
    return None, None


def decoder_head_logits(
    config,
    lm_head: nn.Linear | None,
    classifier: ClassifierHead | None,
    h: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Logits of a decoder's head from its final hidden states h (B, T, d_model)."""
    if lm_head is not None:
        return lm_head(h)  # (B, T, vocab)
    if classifier is None:
        return None
    if config.head == "sequence_classification":  # the last real token has seen the whole sequence
        last = last_token_index(input_ids, attention_mask, config.pad_token_id)
        return classifier(h[torch.arange(h.shape[0], device=h.device), last])  # (B, num_labels)
    return classifier(h)  # (B, T, num_labels or 2)


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None
) -> torch.Tensor:
    """Index of each row's last real token (decoders classify from it: it has seen the whole sequence).
    Works for right and left padding; uses the attention mask, else the pad id, else the last position."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    if attention_mask is not None:
        return (attention_mask.long() * positions).argmax(-1)
    if pad_token_id is not None:
        return ((input_ids != pad_token_id).long() * positions).argmax(-1)
    return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs from seq2seq labels: [start, y_0, ..., y_{T-2}], ignored labels as pad."""
    inputs = labels.new_full(labels.shape, start_token_id)
    inputs[:, 1:] = labels[:, :-1]
    return inputs.masked_fill(inputs == IGNORE_INDEX, pad_token_id)


def head_loss(head: str, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The training loss of `head` for these logits and labels (None without labels)."""
    if labels is None or head == "none":
        return None
    if head == "causal_lm":  # shift the labels, not the logits: slicing (B, T, vocab) logits would copy them
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX)
    if head in ("masked_lm", "seq2seq_lm", "token_classification"):
        return cross_entropy(logits.flatten(0, 1), labels.flatten(), IGNORE_INDEX)
    if head == "sequence_classification":
        num_labels = logits.shape[-1]
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if labels.is_floating_point() and labels.shape == logits.shape:
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())
    if head == "question_answering":
        if labels.shape[-1] != 2:
            raise ValueError(f"question_answering labels must be (batch, 2) [start, end], got {tuple(labels.shape)}")
        seq_len = logits.shape[1]
        starts, ends = (
            labels[:, 0].clamp(0, seq_len),
            labels[:, 1].clamp(0, seq_len),
        )  # out of span -> ignored
        start_loss = F.cross_entropy(logits[..., 0].float(), starts, ignore_index=seq_len)
        end_loss = F.cross_entropy(logits[..., 1].float(), ends, ignore_index=seq_len)
        return (start_loss + end_loss) / 2
    raise ValueError(f"head={head!r} has no loss")
