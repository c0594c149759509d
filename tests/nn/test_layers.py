"""Norms, feed-forward networks and position encodings against their formulas and reference code."""

import math

import pytest
import torch

from lmforge.nn import (
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositionalEmbedding,
    apply_rotary,
    build_ffn,
)
from lmforge.nn.embedding import relative_position_bucket, rope_inverse_frequencies


def test_layernorm_subtracts_mean_and_divides_by_std_not_by_l2_norm():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    norm = LayerNorm(4, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4  # biased variance = 3.5
    expected = (x - mean) / math.sqrt(var) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected)
    assert not torch.allclose(norm(x), x / x.norm() * norm.weight + norm.bias)


def test_layernorm_without_bias_has_no_bias_parameter():
    assert [n for n, _ in LayerNorm(8, bias=False).named_parameters()] == ["weight"]


def test_rmsnorm_divides_by_root_mean_square():
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(RMSNorm(2, eps=0.0)(x), x / math.sqrt((9 + 16) / 2))


def test_rmsnorm_computes_in_fp32_even_for_bf16_input():
    x = torch.randn(2, 8).bfloat16()
    y = RMSNorm(8)(x)
    assert y.dtype == torch.float32  # fp32 gain times bf16 input promotes, as in Llama's reference
    torch.testing.assert_close(y, RMSNorm(8)(x.float()), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "kind, activation, expected",
    [
        ("mlp", "gelu", lambda h, m: m.proj(torch.nn.functional.gelu(m.fc(h)))),
        (
            "mlp",
            "gelu_tanh",
            lambda h, m: m.proj(
                0.5 * m.fc(h) * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m.fc(h) + 0.044715 * m.fc(h) ** 3)))
            ),
        ),
        ("mlp", "relu", lambda h, m: m.proj(torch.relu(m.fc(h)))),
        ("swiglu", "silu", lambda h, m: m.down(torch.nn.functional.silu(m.gate(h)) * m.up(h))),
        ("geglu", "gelu", lambda h, m: m.down(torch.nn.functional.gelu(m.gate(h)) * m.up(h))),
    ],
)
def test_feed_forward_variants_match_their_formulas(kind, activation, expected):
    torch.manual_seed(0)
    ffn = build_ffn(kind, 8, 16, activation, bias=True)
    h = torch.randn(3, 8)
    torch.testing.assert_close(ffn(h), expected(h, ffn), atol=1e-6, rtol=0)


def test_sinusoidal_table_follows_vaswani_formula():
    table = SinusoidalPositionalEmbedding(50, 6).table
    pos, i = 7, 1
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 6)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 6)), abs=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cos_m, sin_m = rope(torch.tensor([[m]]))
        cos_n, sin_n = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_preserves_vector_norms():
    x = torch.randn(2, 3, 10, 16)
    cos, sin = RotaryEmbedding(16)(torch.arange(10)[None].expand(2, 10))
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", **scaling},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inverse_frequencies(
        128,
        500000.0,
        {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_seq_len": 8192,
        },
    )
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 32), (8, 20)])
def test_t5_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 301)[None, :]
    expected = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(relative_position_bucket(rel, bidirectional, num_buckets, max_distance), expected)
