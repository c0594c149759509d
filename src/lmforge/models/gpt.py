"""GPT-2 (Radford et al., 2019): a decoder-only Transformer with learned absolute positions.

    x_0 = E[tokens] + P[positions]
    x_l = x_{l-1} + Attn(LN(x_{l-1})),  then  x_l = x_l + MLP(LN(x_l))      (pre-norm, causal attention)
    logits = LN(x_L) E^T                                                     (output tied to the input embedding)

MLP is d -> 4d -> d with the tanh GELU. Weights start as N(0, 0.02); the two projections that write into
the residual stream (attention output, MLP output) start at 0.02 / sqrt(2 n_layer), so the residual's
variance does not grow with depth (GPT-2 paper, section 2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmforge.models.config import ModelConfig, check_choice, check_fraction, check_heads, check_positive
from lmforge.models.heads import DECODER_HEADS, build_decoder_heads, decoder_head_logits, head_loss
from lmforge.models.output import ModelOutput
from lmforge.nn import (
    Attention,
    Block,
    KVCache,
    LayerNorm,
    LearnedPositionalEmbedding,
    TokenEmbedding,
    build_ffn,
)
from lmforge.nn.attention import StaticKVCache, build_attention_bias
from lmforge.nn.embedding import default_position_ids


@dataclass
class GPTConfig(ModelConfig):
    family: ClassVar[str] = "gpt"
    allowed_heads: ClassVar[tuple[str, ...]] = DECODER_HEADS

    head: str = "causal_lm"
    vocab_size: int = 50257
    max_seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0  # embeddings, residual branches and attention weights
    bias: bool = True
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    pad_token_id: int | None = None

    def validate(self) -> None:
        check_positive(self, "vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "d_ff")
        check_heads(self.n_head, None, self.d_model, None)
        check_fraction(self, "dropout")
        check_choice(self, "activation", ("gelu", "gelu_tanh", "relu", "silu"))

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = TokenEmbedding(c.vocab_size, c.d_model)
        self.pos_emb = LearnedPositionalEmbedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(
                    c.d_model,
                    c.n_head,
                    bias=c.bias,
                    dropout=c.dropout,
                    layer_idx=i,
                    implementation=c.attention,
                ),
                attn_norm=LayerNorm(c.d_model, c.norm_eps, c.bias),
                ffn=build_ffn("mlp", c.d_model, c.ffn_dim, c.activation, c.bias),
                ffn_norm=LayerNorm(c.d_model, c.norm_eps, c.bias),
                prenorm=True,
                dropout=c.dropout,
            )
            for i in range(c.n_layer)
        )
        self.norm = LayerNorm(c.d_model, c.norm_eps, c.bias)
        self.lm_head, self.classifier = build_decoder_heads(c)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
        if self.lm_head is not None and c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T_past + T), 1 = real token; labels as in `heads`.
        logits_to_keep=n > 0 projects only the last n positions to the vocabulary (generation needs just the
        last one; at GPT-2 sizes the (T, vocab) projection of a whole prompt costs as much as 5 layers)."""
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.seq_len() if cache is not None else 0
        if position_ids is None:  # one row per example, not broadcast: DP-SGD needs per-example gradients
            position_ids = default_position_ids(attention_mask, past, T, input_ids.device).expand(B, -1)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, T, d_model)
        mask, is_causal = build_attention_bias(attention_mask, T, past + T, causal=True, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask, is_causal, cache=cache)
        h = self.norm(x)

        if logits_to_keep and self.lm_head is not None:
            logits = self.lm_head(h[:, -logits_to_keep:])  # (B, logits_to_keep, vocab)
        else:
            logits = decoder_head_logits(self.config, self.lm_head, self.classifier, h, input_ids, attention_mask)
        return ModelOutput(
            logits=logits,
            loss=head_loss(self.config.head, logits, labels),
            last_hidden_state=h,
            past_key_values=cache,
        )
