"""Position-wise feed-forward networks.

Plain MLP (Vaswani et al., GPT-2, BERT, T5 v1.0):  FFN(x) = W2 act(W1 x + b1) + b2
Gated MLP (Shazeer, 2020, "GLU Variants Improve Transformer"):
    FFN(x) = W_down (act(W_gate x) * (W_up x))
with act = SiLU for SwiGLU (Llama) and act = GELU for GeGLU (T5 v1.1, which uses the tanh GELU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel, 2016)."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) ~= 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the approximation GPT-2 trained with."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Two linear maps with an activation between them: d_model -> d_ff -> d_model."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = get_activation(activation)
        self.drop = nn.Dropout(dropout)  # T5 drops inside the FFN; others pass 0
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.act(self.fc(x))))


class GatedMLP(nn.Module):
    """GLU-family FFN: SwiGLU with activation="silu", GeGLU with "gelu" or "gelu_tanh"."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "silu", bias: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.act = get_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(self.act(self.gate(x)) * self.up(x)))


FFN_KINDS = ("mlp", "swiglu", "geglu")


def build_ffn(kind: str, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float = 0.0) -> nn.Module:
    """kind "mlp" uses `activation`; "swiglu"/"geglu" are gated with SiLU / `activation` (a GELU)."""
    if kind == "mlp":
        return MLP(d_model, d_ff, activation, bias, dropout)
    if kind == "swiglu":
        return GatedMLP(d_model, d_ff, "silu", bias, dropout)
    if kind == "geglu":
        if not activation.startswith("gelu"):
            raise ValueError(f"ffn='geglu' gates with a GELU; got activation={activation!r}, use 'gelu' or 'gelu_tanh'")
        return GatedMLP(d_model, d_ff, activation, bias, dropout)
    raise ValueError(f"ffn={kind!r} is unknown; choose one of {list(FFN_KINDS)}")
