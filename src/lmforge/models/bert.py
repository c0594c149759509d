"""BERT (Devlin et al., 2018) and RoBERTa (Liu et al., 2019): bidirectional Transformer encoders.

    x_0 = LN(E[tokens] + P[positions] + S[segments])                     (then dropout)
    x_l = LN(x_{l-1} + Attn(x_{l-1})),  then  x_l = LN(x_l + MLP(x_l))    (post-norm, no causal mask)
    pooled = tanh(W_p x_L[0] + b_p)                                      (the first token, [CLS] / <s>)

Attention sees every real token in both directions; pad keys are hidden by the attention mask. The MLP is
d -> 4d -> d with the exact GELU. Heads:
- masked_lm: logits = LN(GELU(W h + b)) E^T + b_vocab, the decoder tied to the token embedding E.
- sequence_classification: BERT puts a linear layer on the pooled vector; RoBERTa has no pooler and
  classifies the first token with its own dense + tanh + linear head. With pooling="mean" the head reads
  the mean of the real tokens' last hidden states instead, sum_t m_t x_L[t] / sum_t m_t (m the attention
  mask), which is how sentence-transformers models (all-MiniLM-L6-v2) make their sentence vectors: the
  vector such a model was trained to produce, and one a linear head separates without moving the encoder.
- token_classification, question_answering: a linear layer on every token.
Only the bare model (head "none") and BERT's sequence classifier carry the pooler, as in the released
checkpoints.

RoBERTa is the same network trained differently (more data, dynamic masking, no next-sentence task). Two
checkpoint-visible differences remain: one segment type instead of two, and positions counted from
pad_token_id + 1 (pads themselves sit at position pad_token_id), which is why its table has 514 rows
for 512 tokens. Weights start as N(0, 0.02), biases at 0, LayerNorms at 1 and 0, as in BERT's release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmforge.models.config import ModelConfig, check_choice, check_fraction, check_heads, check_positive
from lmforge.models.heads import ClassifierHead, MaskedLMHead, head_loss
from lmforge.models.output import ModelOutput
from lmforge.nn import MLP, Attention, Block, LayerNorm, LearnedPositionalEmbedding, TokenEmbedding
from lmforge.nn.attention import build_attention_bias

ENCODER_HEADS = ("none", "masked_lm", "sequence_classification", "token_classification", "question_answering")


@dataclass
class BertConfig(ModelConfig):
    family: ClassVar[str] = "bert"
    allowed_heads: ClassVar[tuple[str, ...]] = ENCODER_HEADS

    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2  # segment ids (sentence A / B)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1  # embeddings, residual branches and classifier input
    attention_dropout: float = 0.1  # attention weights
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooling: str = "first"  # sequence classifier's input: "first" token (as released) or "mean" of real tokens

    def validate(self) -> None:
        check_positive(self, "vocab_size", "max_seq_len", "type_vocab_size", "n_layer", "n_head", "d_model", "d_ff")
        check_heads(self.n_head, None, self.d_model, None)
        check_fraction(self, "dropout", "attention_dropout")
        check_choice(self, "activation", ("gelu", "gelu_tanh", "relu", "silu"))
        check_choice(self, "pooling", ("first", "mean"))
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps!r} must be a positive number")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be a token id in [0, {self.vocab_size})")


def masked_mean(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) -> (B, d): the mean over each row's real tokens (all of them without a mask)."""
    if attention_mask is None:
        return x.mean(dim=1)
    m = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@dataclass
class RobertaConfig(BertConfig):
    family: ClassVar[str] = "roberta"

    vocab_size: int = 50265
    max_seq_len: int = 514  # 512 tokens + positions 0 and 1, which pad_token_id=1 reserves
    type_vocab_size: int = 1
    norm_eps: float = 1e-5
    pad_token_id: int = 1


class Bert(nn.Module):
    """BERT or RoBERTa, depending on the config's family."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = c = config
        self.roberta = c.family == "roberta"
        self.tok_emb = TokenEmbedding(c.vocab_size, c.d_model)
        self.pos_emb = LearnedPositionalEmbedding(c.max_seq_len, c.d_model)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.d_model)
        self.emb_norm = LayerNorm(c.d_model, c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(
                    c.d_model, c.n_head, dropout=c.attention_dropout, layer_idx=i, implementation=c.attention
                ),
                attn_norm=LayerNorm(c.d_model, c.norm_eps),
                ffn=MLP(c.d_model, c.d_ff, c.activation),
                ffn_norm=LayerNorm(c.d_model, c.norm_eps),
                prenorm=False,
                dropout=c.dropout,
            )
            for i in range(c.n_layer)
        )
        has_pooler = c.head == "none" or (
            c.head == "sequence_classification" and not self.roberta and c.pooling == "first"
        )
        self.pooler = nn.Linear(c.d_model, c.d_model) if has_pooler else None
        self.lm_head = self.classifier = None
        if c.head == "masked_lm":
            # RoBERTa's released head applies the exact GELU whatever the encoder's activation.
            self.lm_head = MaskedLMHead(c.d_model, c.vocab_size, "gelu" if self.roberta else c.activation, c.norm_eps)
        elif c.head == "sequence_classification":
            self.classifier = ClassifierHead(c.d_model, c.num_labels, dropout=c.dropout, hidden=self.roberta)
        elif c.head == "token_classification":
            self.classifier = ClassifierHead(c.d_model, c.num_labels, dropout=c.dropout)
        elif c.head == "question_answering":
            self.classifier = ClassifierHead(c.d_model, 2)
        self.apply(self._init_weights)
        if self.lm_head is not None:
            self.lm_head.decoder.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BERT: 0, 1, 2, ... RoBERTa: pad + (number of real tokens up to and including this one) for real
        tokens, pad for pads, read from the ids (not the attention mask), as its checkpoints expect."""
        if not self.roberta:
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        pad = self.config.pad_token_id
        real = (input_ids != pad).long()
        return real.cumsum(-1) * real + pad

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T), 1 = real token; token_type_ids (B, T), default 0."""
        B, T = input_ids.shape
        if position_ids is None:  # one row per example (not broadcast): DP-SGD needs per-example gradients
            position_ids = self.default_position_ids(input_ids).expand(B, -1)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids) + self.type_emb(token_type_ids)
        x = self.drop(self.emb_norm(x))  # (B, T, d_model)
        mask, _ = build_attention_bias(attention_mask, T, T, causal=False, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None  # (B, d_model)

        logits = None
        if self.lm_head is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
        elif self.config.head == "sequence_classification" and self.config.pooling == "mean":
            logits = self.classifier(masked_mean(x, attention_mask))  # (B, num_labels)
        elif self.config.head == "sequence_classification":
            logits = self.classifier(x[:, 0] if self.roberta else pooled)  # (B, num_labels)
        elif self.classifier is not None:
            logits = self.classifier(x)  # (B, T, num_labels or 2)
        return ModelOutput(
            logits=logits,
            loss=head_loss(self.config.head, logits, labels),
            last_hidden_state=x,
            pooler_output=pooled,
        )
