"""Building blocks shared by every model family. Imports nothing from the rest of lmforge."""

from lmforge.nn.attention import (
    Attention,
    KVCache,
    attention_probabilities,
    build_attention_bias,
    recorded_attention,
    reference_attention,
    sdpa_attention,
)
from lmforge.nn.block import Block
from lmforge.nn.embedding import (
    LearnedPositionalEmbedding,
    RelativePositionBias,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    TokenEmbedding,
    apply_rotary,
)
from lmforge.nn.mlp import MLP, GatedMLP, build_ffn
from lmforge.nn.norm import LayerNorm, RMSNorm, build_norm

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "GatedMLP",
    "KVCache",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "RMSNorm",
    "RelativePositionBias",
    "RotaryEmbedding",
    "SinusoidalPositionalEmbedding",
    "TokenEmbedding",
    "apply_rotary",
    "attention_probabilities",
    "build_attention_bias",
    "build_ffn",
    "build_norm",
    "recorded_attention",
    "reference_attention",
    "sdpa_attention",
]
