"""Token embeddings and the four ways of telling a Transformer where a token is.

- Learned absolute positions (GPT-2, BERT): a trainable table P, input = E[token] + P[position].
- Sinusoidal (Vaswani et al., 2017, section 3.5): a fixed table
      PE(pos, 2i) = sin(pos / 10000^(2i/d)),   PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).
- Rotary (RoPE; Su et al., 2021): rotate each pair of query/key features by an angle pos * w_i with
  w_i = theta^(-2i/d). Then q_m . k_n depends on m - n only, and nothing is added to the residual stream.
- T5 relative position bias (Raffel et al., 2020): a learned scalar per head and per *bucket* of the
  distance key - query, added to the attention logits. Buckets are exact for small distances and
  logarithmic up to `max_distance`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Fail with a clear message before an out-of-range id reaches an index op (a CPU IndexError or a
    CUDA device-side assert). Skipped while torch.compile traces, where it would break the graph, and on
    tensors without values (meta, or the fake tensors `lmforge.train.plan` traces with)."""
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if torch.compiler.is_compiling() or input_ids.numel() == 0 or _valueless(input_ids):
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
            f"check the tokenizer matches the model or raise vocab_size"
        )


def _valueless(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or is_fake(t)


def check_positions(n_positions: int, max_positions: int) -> None:
    if n_positions > max_positions:
        raise ValueError(
            f"sequence of {n_positions} positions is longer than the model's max_seq_len={max_positions}; "
            f"truncate the input or build the model with a larger max_seq_len"
        )


class TokenEmbedding(nn.Embedding):
    """E[token] * scale. `scale` is sqrt(d_model) in the original Transformer, 1 elsewhere."""

    def __init__(self, vocab_size: int, dim: int, padding_idx: int | None = None, scale: float = 1.0) -> None:
        super().__init__(vocab_size, dim, padding_idx=padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.num_embeddings)
        x = super().forward(input_ids)
        return x * self.scale if self.scale != 1.0 else x


class LearnedPositionalEmbedding(nn.Embedding):
    """A trainable vector per absolute position 0 .. max_positions - 1."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions, dim)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and not torch.compiler.is_compiling() and not _valueless(position_ids):
            check_positions(int(position_ids.max()) + 1, self.num_embeddings)
        return super().forward(position_ids)


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(n_positions, dim) table: even features sin(pos * w_i), odd features cos(pos * w_i), w_i = base^(-2i/d)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    w = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * w)
    table[:, 1::2] = torch.cos(pos * w[: dim // 2])
    return table.float()


class SinusoidalPositionalEmbedding(nn.Module):
    """The fixed table of Vaswani et al.; a buffer, not a parameter, and not saved in checkpoints."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.register_buffer("table", sinusoidal_table(max_positions, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and not torch.compiler.is_compiling() and not _valueless(position_ids):
            check_positions(int(position_ids.max()) + 1, self.max_positions)
        return self.table[position_ids]


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """w_i = theta^(-2i/d) for i < d/2, optionally rescaled the Llama 3.1 way.

    Llama 3.1 scaling (`scaling = {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_seq_len"}`) stretches long wavelengths to fit a longer context: with
    L = original_max_seq_len and wavelength lambda_i = 2 pi / w_i,
      lambda_i < L / high_freq_factor  -> w_i unchanged (high frequencies carry local order),
      lambda_i > L / low_freq_factor   -> w_i / factor,
      otherwise a linear blend: (1 - s) w_i / factor + s w_i, s = (L / lambda_i - low) / (high - low).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaling:
        return inv_freq
    kind = scaling.get("type", "llama3")
    if kind != "llama3":
        raise ValueError(f"rope_scaling type={kind!r} is unknown; the supported type is 'llama3'")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_seq_len"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    s = (context / wavelen - low) / (high - low)
    blended = (1 - s) * scaled / factor + s * scaled
    is_medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of pos * w_i for given positions; `apply_rotary` rotates q and k with them.

    Features are paired as (x_i, x_{i + d/2}) ("rotate half", the Hugging Face Llama layout), which is a
    fixed permutation of the paper's adjacent pairs and gives the same attention scores.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, head_dim), in fp32."""
        angles = position_ids.float()[..., None] * self.inv_freq.float()  # (B, T, d/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Map key - query distances to bucket ids in [0, num_buckets).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before it.
    Causal (decoder): only distances to earlier keys count; later keys share bucket 0 (they are masked).
    Within a half, distances below num_buckets/2 get their own bucket; larger ones share logarithmically
    spaced buckets up to max_distance, beyond which everything lands in the last bucket.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5's learned bias b[head, bucket(key - query)], returned as (1, H, T_q, T_k) to add to the logits."""

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, n_head)

    def forward(self, q_len: int, k_len: int, offset: int = 0) -> torch.Tensor:
        """`offset` is the position of the first query (the cache length during incremental decoding)."""
        device = self.embedding.weight.device
        query = torch.arange(offset, offset + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T_q, T_k)


def default_position_ids(attention_mask: torch.Tensor | None, past_len: int, q_len: int, device) -> torch.Tensor:
    """Positions of the q_len new tokens: past_len, past_len + 1, ... or, with a padding mask covering
    cached + new tokens, the count of real tokens before each one, so left-padded rows start at 0."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None, :]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -q_len:]
