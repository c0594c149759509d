"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017): an encoder-decoder for translation.

    x_0 = Dropout(sqrt(d) E_src[source] + PE)                     encoder input (section 3.4, 3.5)
    x_l = LN(x + Dropout(SelfAttn(x)));  x_l = LN(x + Dropout(FFN(x)))                  (N encoder layers)
    y_0 = Dropout(sqrt(d) E_tgt[target] + PE)                     decoder input (targets shifted right)
    y_l = LN(y + Dropout(CausalSelfAttn(y)));  y_l = LN(y + Dropout(CrossAttn(y, x_N)));
          y_l = LN(y_l + Dropout(FFN(y_l)))                                               (N decoder layers)
    logits = y_N E_tgt^T                                          pre-softmax linear tied to E_tgt (3.4)

Every sublayer is post-norm (LayerNorm after the residual sum), so there is no final norm. FFN(x) =
W2 ReLU(W1 x + b1) + b2 with d_ff = 4 d. PE is the fixed sinusoidal table. With one shared vocabulary
(the paper's byte-pair vocabulary of about 37000 tokens for English-German) E_src = E_tgt, so a single
matrix serves the encoder input, the decoder input and the output projection.

Dropout follows section 5.4: on each sublayer output before the residual sum and on the embedding sums;
not on attention weights (later tensor2tensor versions added that).

The sqrt(d) factor makes up for the embedding's small initialisation: E starts as N(0, d^-1/2), which is
the right scale for the tied output projection (logits of unit variance from unit-variance y), and
sqrt(d) E[token] then has entries of unit variance, the scale of the sinusoids it is added to. Every
other matrix starts Glorot/Xavier uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), and biases at
0, as in tensor2tensor. The fused q/k/v (and k/v) matrices get that bound per d x d projection, since the
paper's W^Q, W^K and W^V are separate matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lmforge.models.config import ModelConfig, check_choice, check_fraction, check_heads, check_positive
from lmforge.models.heads import head_loss, shift_right
from lmforge.models.output import ModelOutput
from lmforge.nn import (
    Attention,
    Block,
    KVCache,
    LayerNorm,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    build_ffn,
)
from lmforge.nn.attention import build_attention_bias
from lmforge.nn.embedding import default_position_ids


@dataclass
class TransformerConfig(ModelConfig):
    family: ClassVar[str] = "transformer"
    allowed_heads: ClassVar[tuple[str, ...]] = ("seq2seq_lm", "none")

    head: str = "seq2seq_lm"
    vocab_size: int = 37000  # source vocabulary
    tgt_vocab_size: int | None = None  # None: the source vocabulary
    share_embeddings: bool = True  # one matrix for source and target embeddings (needs one vocabulary)
    tie_embeddings: bool = True  # the pre-softmax linear is the target embedding
    max_seq_len: int = 1024
    n_layer: int = 6  # encoder layers
    n_decoder_layer: int | None = None  # None: n_layer
    n_head: int = 8
    d_model: int = 512
    d_ff: int = 2048
    activation: str = "relu"
    dropout: float = 0.1  # embedding sums and sublayer outputs
    norm_eps: float = 1e-5
    pad_token_id: int = 0
    bos_token_id: int = 1  # decoder start token
    eos_token_id: int = 2

    def validate(self) -> None:
        check_positive(self, "vocab_size", "tgt_vocab_size", "max_seq_len", "n_layer", "n_decoder_layer")
        check_positive(self, "n_head", "d_model", "d_ff")
        check_heads(self.n_head, None, self.d_model, None)
        check_fraction(self, "dropout")
        check_choice(self, "activation", ("relu", "gelu", "gelu_tanh", "silu"))
        if self.share_embeddings and self.target_vocab_size != self.vocab_size:
            raise ValueError(
                f"share_embeddings=True needs one vocabulary, but vocab_size={self.vocab_size} and "
                f"tgt_vocab_size={self.tgt_vocab_size}; set tgt_vocab_size=None or share_embeddings=False"
            )
        for name, vocabularies in (
            ("pad_token_id", {"vocab_size": self.vocab_size, "tgt_vocab_size": self.target_vocab_size}),
            ("bos_token_id", {"tgt_vocab_size": self.target_vocab_size}),
            ("eos_token_id", {"tgt_vocab_size": self.target_vocab_size}),
        ):
            value = getattr(self, name)
            for vocab_name, size in vocabularies.items():
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                    raise ValueError(f"{name}={value!r} must be a token id in [0, {vocab_name}={size})")

    @property
    def target_vocab_size(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layer or self.n_layer


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        d, tgt_vocab = c.d_model, c.target_vocab_size
        self.src_emb = TokenEmbedding(c.vocab_size, d, scale=math.sqrt(d))
        self.tgt_emb = self.src_emb
        if not c.share_embeddings:
            self.tgt_emb = TokenEmbedding(tgt_vocab, d, scale=math.sqrt(d))
        self.pos_emb = SinusoidalPositionalEmbedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(self._layer(i, cross=False) for i in range(c.n_layer))
        self.decoder = nn.ModuleList(self._layer(i, cross=True) for i in range(c.decoder_layers))
        self.lm_head = nn.Linear(d, tgt_vocab, bias=False) if c.head == "seq2seq_lm" else None
        self.apply(self._init_weights)
        if self.lm_head is not None and c.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def _layer(self, i: int, cross: bool) -> Block:
        c = self.config

        def attention(is_cross: bool) -> Attention:
            return Attention(c.d_model, c.n_head, cross=is_cross, layer_idx=i, implementation=c.attention)

        return Block(
            attn=attention(False),
            attn_norm=LayerNorm(c.d_model, c.norm_eps),
            cross_attn=attention(True) if cross else None,
            cross_norm=LayerNorm(c.d_model, c.norm_eps) if cross else None,
            ffn=build_ffn("mlp", c.d_model, c.d_ff, c.activation, bias=True),
            ffn_norm=LayerNorm(c.d_model, c.norm_eps),
            prenorm=False,
            dropout=c.dropout,
        )

    def _init_weights(self, module: nn.Module) -> None:
        """Run by `apply`, which visits children first: an Attention re-initialises its fused Linears."""
        if isinstance(module, TokenEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.d_model**-0.5)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Attention):  # q, k and v are d x d projections stacked by rows
            for linear in (module.q, module.kv) if module.cross else (module.qkv,):
                for projection in linear.weight.data.split(module.n_head * module.head_dim, dim=0):
                    nn.init.xavier_uniform_(projection)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> encoder output (B, S, d_model); attention_mask (B, S), 1 = real token."""
        x = self._embed(self.src_emb, input_ids, attention_mask, past=0)
        mask, _ = build_attention_bias(attention_mask, input_ids.shape[1], input_ids.shape[1], False, x.dtype)
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def _embed(
        self, embedding: TokenEmbedding, ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        positions = default_position_ids(attention_mask, past, ids.shape[1], ids.device)
        return self.drop(embedding(ids) + self.pos_emb(positions))  # (B, T, d_model)

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
        """Source input_ids (B, S) with attention_mask (B, S), or a precomputed `encoder_outputs` (B, S, d);
        decoder_input_ids (B, T) with decoder_attention_mask (B, T_past + T); labels (B, T) are the target
        tokens, from which decoder inputs are made by shifting right when none are given.

        While decoding with the cache, pass the new target tokens only, the same source attention_mask
        and the encoder output of the first step (`encoder_outputs`), so the source is encoded once.
        """
        c = self.config
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass the source input_ids or a precomputed encoder_outputs")
            encoder_outputs = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids, or labels to build them from by shifting right")
            decoder_input_ids = shift_right(labels, c.bos_token_id, c.pad_token_id)

        T, S = decoder_input_ids.shape[1], encoder_outputs.shape[1]
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.seq_len() if cache is not None else 0
        y = self._embed(self.tgt_emb, decoder_input_ids, decoder_attention_mask, past)
        self_mask, is_causal = build_attention_bias(decoder_attention_mask, T, past + T, True, y.dtype)
        cross_mask, _ = build_attention_bias(attention_mask, T, S, False, y.dtype)
        for layer in self.decoder:
            y = layer(y, self_mask, is_causal, cache=cache, memory=encoder_outputs, memory_mask=cross_mask)

        logits = self.lm_head(y) if self.lm_head is not None else None  # (B, T, tgt_vocab)
        return ModelOutput(
            logits=logits,
            loss=head_loss(c.head, logits, labels),
            last_hidden_state=y,
            past_key_values=cache,
            encoder_last_hidden_state=encoder_outputs,
        )
