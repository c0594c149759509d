"""Llama (Touvron et al., 2023): a decoder-only Transformer with rotary positions, RMSNorm and SwiGLU.

    x_0 = E[tokens]                                                       (no position vectors are added)
    x_l = x_{l-1} + Attn(RMSNorm(x_{l-1}); RoPE),  then  x_l = x_l + SwiGLU(RMSNorm(x_l))
    logits = RMSNorm(x_L) W_out                          (W_out = E^T when tie_embeddings, as in SmolLM2)

Positions enter only through RoPE: query and key features are rotated by pos * w_i, w_i = theta^(-2i/d_head),
so attention scores depend on relative distance (Llama 3.1 stretches the low frequencies, `rope_scaling`).
SwiGLU(x) = W_down (SiLU(W_gate x) * (W_up x)); with three matrices instead of two, the hidden width is
2/3 of the usual 4 d_model (rounded up to a multiple of 256), which keeps the parameter count of a 4d MLP.
Grouped-query attention (`n_kv_heads` < `n_head`, Llama 2 70B and Llama 3) shares each key/value head
among n_head / n_kv_heads query heads, shrinking the KV cache.

The same file covers the close relatives: Mistral (identical layers; its sliding window equals full
attention up to the window length), Qwen2 (bias on q/k/v only: attention_bias=True, attention_out_bias=False)
and Qwen3 (RMSNorm on each query and key head before RoPE: qk_norm=True).

Weights start as N(0, 0.02), biases at 0 and norm gains at 1, as in the Hugging Face reference that
Llama checkpoints are fine-tuned with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmforge.models.config import ModelConfig, check_fraction, check_heads, check_positive
from lmforge.models.heads import DECODER_HEADS, build_decoder_heads, decoder_head_logits, head_loss
from lmforge.models.output import ModelOutput
from lmforge.nn import Attention, Block, KVCache, RMSNorm, RotaryEmbedding, TokenEmbedding, build_ffn
from lmforge.nn.attention import StaticKVCache, build_attention_bias
from lmforge.nn.embedding import check_positions, default_position_ids

ROPE_SCALING_KEYS = ("type", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


@dataclass
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    allowed_heads: ClassVar[tuple[str, ...]] = DECODER_HEADS

    head: str = "causal_lm"
    vocab_size: int = 32000
    max_seq_len: int = 2048
    n_layer: int = 12
    n_head: int = 12
    n_kv_heads: int | None = None  # None: n_head (multi-head attention); 1: multi-query attention
    d_model: int = 768
    d_ff: int | None = None  # None: 8 d_model / 3 rounded up to a multiple of 256
    head_dim: int | None = None  # None: d_model // n_head
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1: {"type": "llama3", ...}, see `rope_inverse_frequencies`
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    attention_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3)
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual branches and attention weights
    pad_token_id: int | None = None

    def validate(self) -> None:
        sizes = (
            "vocab_size",
            "max_seq_len",
            "n_layer",
            "n_head",
            "n_kv_heads",
            "d_model",
            "d_ff",
            "head_dim",
        )
        check_positive(self, *sizes)
        check_heads(self.n_head, self.n_kv_heads, self.d_model, self.head_dim)
        check_fraction(self, "dropout")
        if self.head_width % 2:
            raise ValueError(f"head_dim={self.head_width} must be even for RoPE; choose an even head_dim")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be a positive number (10000 in Llama 2)")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps!r} must be a positive number")
        if self.rope_scaling is not None:
            keys = set(self.rope_scaling)
            if self.rope_scaling.get("type", "llama3") != "llama3" or keys - set(ROPE_SCALING_KEYS):
                raise ValueError(
                    f"rope_scaling={self.rope_scaling!r} is not supported; use None or a dict with "
                    f"type='llama3' and the keys {list(ROPE_SCALING_KEYS[1:])}"
                )
            missing = sorted(set(ROPE_SCALING_KEYS[1:]) - keys)
            if missing:
                raise ValueError(
                    f"rope_scaling is missing {missing}; llama3 scaling needs {list(ROPE_SCALING_KEYS[1:])}"
                )

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        hidden = int(2 * 4 * self.d_model / 3)
        return 256 * -(-hidden // 256)

    @property
    def head_width(self) -> int:
        """Features per attention head (RoPE rotates all of them)."""
        return self.head_dim or self.d_model // self.n_head


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = c = config
        self.tok_emb = TokenEmbedding(c.vocab_size, c.d_model)
        self.rope = RotaryEmbedding(c.head_width, c.rope_theta, c.rope_scaling)
        self.blocks = nn.ModuleList(
            Block(
                attn=Attention(
                    c.d_model,
                    c.n_head,
                    n_kv_heads=c.n_kv_heads,
                    head_dim=c.head_dim,
                    bias=c.attention_bias,
                    out_bias=c.attention_out_bias,
                    qk_norm=c.qk_norm,
                    norm_eps=c.norm_eps,
                    dropout=c.dropout,
                    layer_idx=i,
                    implementation=c.attention,
                ),
                attn_norm=RMSNorm(c.d_model, c.norm_eps),
                ffn=build_ffn("swiglu", c.d_model, c.ffn_dim, "silu", c.mlp_bias),
                ffn_norm=RMSNorm(c.d_model, c.norm_eps),
                prenorm=True,
                dropout=c.dropout,
            )
            for i in range(c.n_layer)
        )
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head, self.classifier = build_decoder_heads(c)
        self.apply(self._init_weights)
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
        check_positions(past + T, self.config.max_seq_len)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, T, input_ids.device)
        x = self.tok_emb(input_ids)  # (B, T, d_model)
        rope = self.rope(position_ids)  # cos, sin: (B or 1, T, head_dim)
        mask, is_causal = build_attention_bias(attention_mask, T, past + T, causal=True, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, mask, is_causal, rope, cache=cache)
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
