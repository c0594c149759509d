"""Parameter counts and FLOPs per token, for tables and for MFU (model FLOPs utilisation).

Training FLOPs per token follow Kaplan et al. (2020) and the PaLM paper (appendix B):

    FLOPs/token ~= 6 N + 12 * sum_attention_layers(n_head * head_dim) * T

N counts the weights that take part in matrix multiplies (every Linear, including a tied output
projection; not embedding lookups, norms or position tables): each such weight costs 2 FLOPs per token
forward and 4 backward. The second term is QK^T and AV over a context of T tokens (2 matmuls x 2 FLOPs x
3 for forward + backward), counted over the full T x T square as PaLM does, not halved for causality.
For encoder-decoders, a token means a (source, target) position pair with T the length of both sides, an
approximation that is exact when the two lengths are equal.
"""

from __future__ import annotations

from torch import nn

from lmforge.models.build import measure_by_layers
from lmforge.models.config import ModelConfig
from lmforge.nn.attention import Attention


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def matmul_parameters(model: nn.Module) -> int:
    """Weights used in matrix multiplies, a tied output projection counted again as the matmul it is, and the
    input and recurrent matrices of LSTM/GRU layers (each multiplies every token once per direction)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    recurrent = sum(p.numel() for m in rnns for n, p in m.named_parameters() if n.startswith("weight"))
    return linear + recurrent


def attention_width(model: nn.Module) -> int:
    """The sum over attention layers of n_head * head_dim: the width of their QK^T and AV products."""
    return sum(m.n_head * m.head_dim for m in model.modules() if isinstance(m, Attention))


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Forward + backward FLOPs per token at context length `seq_len` (see the module docstring)."""
    return 6 * matmul_parameters(model) + 12 * attention_width(model) * seq_len


def model_stats(config: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Parameter count and FLOPs/token of a config, measured on weightless ("meta") instances of one and two
    layers (`lmforge.models.build.measure_by_layers`: both grow by the same amount per layer), so
    a config of 10^9 layers costs what a small one does."""
    seq_len = seq_len or getattr(config, "max_seq_len", 512)

    def measure(model: nn.Module) -> tuple[int, int]:
        return count_parameters(model), flops_per_token(model, seq_len)

    parameters, flops = measure_by_layers(config, measure)
    return {"parameters": parameters, "flops_per_token": flops}
