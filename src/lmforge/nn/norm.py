"""Normalisation layers.

LayerNorm (Ba et al., 2016) normalises each vector over its features:

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

with the *biased* (population) variance var(x) = mean((x - mean(x))^2). Note what it is not:
dividing by the L2 norm ||x|| (a shortcut some tutorials take) neither centres the vector nor
scales it to unit variance, so it is a different function with different gradients.

RMSNorm (Zhang & Sennrich, 2019) drops the centring and the bias:

    y = x / sqrt(mean(x^2) + eps) * weight

Llama and T5 use it (T5 calls it "LayerNorm" without mean subtraction). It is computed in fp32
whatever the input dtype, as both reference implementations do, then cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 and BERT have one; some modern models drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm: rescales x to unit RMS, then multiplies by a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """`kind` is "layernorm" or "rmsnorm"; configs name the norm by string so they stay JSON."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r} is unknown; choose 'layernorm' or 'rmsnorm'")
