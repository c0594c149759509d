"""T5 (Raffel et al., 2020): an encoder-decoder Transformer with relative position bias and RMSNorm.

    encoder:  x_0 = E[source];  x_l = x_{l-1} + SelfAttn(N(x_{l-1}), bias=B_enc);  x_l = x_l + FFN(N(x_l))
    decoder:  y_0 = E[target];  y_l = y_{l-1} + CausalSelfAttn(N(y_{l-1}), bias=B_dec)
                                y_l = y_l + CrossAttn(N(y_l), N_enc(x_L));  y_l = y_l + FFN(N(y_l))
    logits = N_dec(y_L) * d_model^-0.5 E^T        (v1.0: output tied to the shared embedding E)
    logits = N_dec(y_L) W_out                      (v1.1: a separate output matrix, no scaling)

N is RMSNorm (T5's "LayerNorm" has no mean subtraction and no bias); every Linear is bias-free. There are
no position embeddings: each attention logit gets a learned scalar B[head, bucket(key - query)]
(`RelativePositionBias`), computed once per stack and shared by all its layers; bidirectional buckets in
the encoder, causal ones in the decoder. Cross-attention has no position bias.

FFN is ReLU(x W_i) W_o in v1.0 and (GELU_tanh(x W_0) * x W_1) W_o (GeGLU) in v1.1.

Attention uses scale 1 instead of 1/sqrt(d_head): the factor lives in the initialisation (Mesh TF), where
q ~ N(0, (d_model d_head)^-1/2) and k, v ~ N(0, d_model^-1/2). For unit-RMS inputs each k entry then has
variance 1 and each q entry 1/d_head, so q . k over d_head features has variance ~1, as with the usual
scaling. Likewise the output projections start at (fan_in)^-1/2 and embeddings at N(0, 1); the tied
output multiplies by d_model^-1/2 so that logits = h . E[v] (a sum of d_model unit terms) stay near unit
variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmforge.models.config import ModelConfig, check_choice, check_fraction, check_positive
from lmforge.models.heads import head_loss, shift_right
from lmforge.models.output import ModelOutput
from lmforge.nn import Attention, Block, KVCache, RelativePositionBias, RMSNorm, TokenEmbedding, build_ffn
from lmforge.nn.attention import build_attention_bias


@dataclass
class T5Config(ModelConfig):
    family: ClassVar[str] = "t5"
    allowed_heads: ClassVar[tuple[str, ...]] = ("seq2seq_lm", "none")

    head: str = "seq2seq_lm"
    vocab_size: int = 32128
    d_model: int = 512
    head_dim: int = 64  # T5's d_kv; n_head * head_dim need not equal d_model
    d_ff: int = 2048
    n_layer: int = 6  # encoder layers
    n_decoder_layer: int | None = None  # None: n_layer
    n_head: int = 8
    ffn: str = "mlp"  # "mlp": ReLU FFN of v1.0; "geglu": gated GELU of v1.1 (with activation="gelu_tanh")
    activation: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout: float = 0.1  # embeddings, residual branches, inside the FFN, attention weights, final norm
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # v1.0: tied output scaled by d_model^-0.5; v1.1: separate lm_head
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    eos_token_id: int = 1

    def validate(self) -> None:
        check_positive(
            self,
            "vocab_size",
            "d_model",
            "head_dim",
            "d_ff",
            "n_layer",
            "n_decoder_layer",
            "n_head",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        )
        check_fraction(self, "dropout")
        check_choice(self, "ffn", ("mlp", "geglu"))
        check_choice(self, "activation", ("relu", "gelu", "gelu_tanh", "silu"))
        if self.ffn == "geglu" and not self.activation.startswith("gelu"):
            raise ValueError(
                f"ffn='geglu' gates with a GELU, but activation={self.activation!r}; "
                f"use activation='gelu_tanh' (T5 v1.1) or 'gelu'"
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 "
                f"(the encoder splits the buckets by direction, then into exact and logarithmic halves)"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise ValueError(
                f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                f"relative_attention_num_buckets // 2 = {self.relative_attention_num_buckets // 2}, "
                f"the largest distance with its own bucket"
            )
        for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})")

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer


class T5Stack(nn.Module):
    """The encoder (decoder=False) or the decoder (decoder=True, with causal self-attention and
    cross-attention to the encoder output) as a list of pre-norm blocks and a final RMSNorm."""

    def __init__(self, c: T5Config, n_layer: int, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.position_bias = RelativePositionBias(
            c.n_head,
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
            bidirectional=not decoder,
        )

        def attention(i: int, cross: bool = False) -> Attention:
            return Attention(
                c.d_model,
                c.n_head,
                head_dim=c.head_dim,
                bias=False,
                cross=cross,
                scale=1.0,
                dropout=c.dropout,
                layer_idx=i,
                implementation=c.attention,
            )

        self.blocks = nn.ModuleList(
            Block(
                attn=attention(i),
                attn_norm=RMSNorm(c.d_model, c.norm_eps),
                ffn=build_ffn(c.ffn, c.d_model, c.d_ff, c.activation, bias=False, dropout=c.dropout),
                ffn_norm=RMSNorm(c.d_model, c.norm_eps),
                cross_attn=attention(i, cross=True) if decoder else None,
                cross_norm=RMSNorm(c.d_model, c.norm_eps) if decoder else None,
                prenorm=True,
                dropout=c.dropout,
            )
            for i in range(n_layer)
        )
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) token embeddings -> (B, T, d_model). `attention_mask` covers cached + new
        positions; `memory` (B, S, d_model) is the encoder output, `memory_mask` (B, S) its padding."""
        T = x.shape[1]
        past = cache.seq_len() if cache is not None else 0
        bias = self.position_bias(T, past + T, offset=past)  # (1, H, T, past + T), shared by all layers
        mask, _ = build_attention_bias(attention_mask, T, past + T, self.decoder, x.dtype, position_bias=bias)
        memory_bias = None
        if memory is not None:
            memory_bias, _ = build_attention_bias(memory_mask, T, memory.shape[1], False, x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask, cache=cache, memory=memory, memory_mask=memory_bias)
        return self.drop(self.norm(x))


class T5(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = c = config
        self.shared = TokenEmbedding(c.vocab_size, c.d_model)  # encoder input, decoder input (and v1.0 output)
        self.encoder = T5Stack(c, c.n_layer, decoder=False)
        self.decoder = T5Stack(c, c.decoder_layers, decoder=True)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False) if c.head == "seq2seq_lm" else None
        self._init_weights()
        if self.lm_head is not None and c.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mesh TF's factor-scaled normal init (see the module docstring)."""
        c = self.config
        inner = c.n_head * c.head_dim
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for stack in (self.encoder, self.decoder):
            nn.init.normal_(stack.position_bias.embedding.weight, std=c.d_model**-0.5)
            for block in stack.blocks:
                qkv = block.attn.qkv.weight  # rows: [q; k; v]
                nn.init.normal_(qkv[:inner], std=(c.d_model * c.head_dim) ** -0.5)
                nn.init.normal_(qkv[inner:], std=c.d_model**-0.5)
                nn.init.normal_(block.attn.out.weight, std=inner**-0.5)
                if block.cross_attn is not None:
                    nn.init.normal_(block.cross_attn.q.weight, std=(c.d_model * c.head_dim) ** -0.5)
                    nn.init.normal_(block.cross_attn.kv.weight, std=c.d_model**-0.5)
                    nn.init.normal_(block.cross_attn.out.weight, std=inner**-0.5)
                for name, linear in block.ffn.named_children():
                    if isinstance(linear, nn.Linear):
                        fan_in = c.d_ff if name in ("proj", "down") else c.d_model
                        nn.init.normal_(linear.weight, std=fan_in**-0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder output (B, S, d_model); reuse it for every decoding step."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """input_ids (B, S) and attention_mask (B, S) for the encoder (or its output `encoder_outputs`);
        decoder_input_ids (B, T), else built from labels (B, T) by `shift_right`; decoder_attention_mask
        (B, T_past + T). The cache holds decoder self-attention keys/values and the cross-attention ones."""
        c = self.config
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids (the source tokens) or encoder_outputs (from `encode`)")
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, or labels to build them by shifting right")
            decoder_input_ids = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        h = self.decoder(
            self.shared(decoder_input_ids),
            decoder_attention_mask,
            memory=encoder_outputs,
            memory_mask=attention_mask,
            cache=cache,
        )  # (B, T, d_model)

        logits = None
        if self.lm_head is not None:
            logits = self.lm_head(h * c.d_model**-0.5 if c.tie_embeddings else h)  # (B, T, vocab)
        return ModelOutput(
            logits=logits,
            loss=head_loss(c.head, logits, labels),
            last_hidden_state=h,
            past_key_values=cache,
            encoder_last_hidden_state=encoder_outputs,
        )
