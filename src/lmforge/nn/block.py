"""One Transformer layer: residual sublayers of attention (self, then optionally cross) and feed-forward.

Pre-norm (GPT-2, Llama, T5):   x <- x + Dropout(Sublayer(Norm(x)))
Post-norm (Vaswani et al., BERT): x <- Norm(x + Dropout(Sublayer(x)))

Pre-norm keeps an identity path from input to output, so deep stacks train without warmup tricks
(Xiong et al., 2020); post-norm is what the original Transformer and BERT used, and what their
checkpoints need. Pre-norm models put one more norm after the last layer; the model file adds it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.nn.attention import Attention, KVCache


class Block(nn.Module):
    def __init__(
        self,
        attn: Attention,
        attn_norm: nn.Module,
        ffn: nn.Module,
        ffn_norm: nn.Module,
        cross_attn: Attention | None = None,
        cross_norm: nn.Module | None = None,
        prenorm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn, self.attn_norm = attn, attn_norm
        self.cross_attn, self.cross_norm = cross_attn, cross_norm
        self.ffn, self.ffn_norm = ffn, ffn_norm
        self.prenorm = prenorm
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); `memory` is the encoder output for cross-attention."""
        if self.prenorm:
            x = x + self.drop(self.attn(self.attn_norm(x), mask, is_causal, rope, cache))
            if self.cross_attn is not None:
                x = x + self.drop(self.cross_attn(self.cross_norm(x), memory_mask, cache=cache, memory=memory))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, mask, is_causal, rope, cache)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, memory_mask, cache=cache, memory=memory)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))
