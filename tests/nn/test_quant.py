"""int8 weight-only quantisation: the rounding bound, the kernel against dequantised weights, the model swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge import build_model
from lmforge.nn import quant
from lmforge.nn.quant import QuantizedLinear, quantize_int8, quantize_per_channel


def test_per_channel_rounding_error_is_at_most_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.allclose(scale, w.abs().amax(1) / 127)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize(("kernel", "rows"), [(True, 5), (False, 5), (True, 40)])  # 3 x 40 rows: the dense path
def test_quantized_linear_matches_the_dequantised_weight(kernel, rows, monkeypatch):
    monkeypatch.setattr(quant, "_has_int8pack_kernel", lambda: kernel)
    linear = nn.Linear(96, 40)
    qlinear = QuantizedLinear.from_linear(linear)
    x = torch.randn(3, rows, 96)
    expected = nn.functional.linear(x, qlinear.dequantized_weight(), linear.bias)
    got = qlinear(x)
    assert got.shape == (3, rows, 40) and got.dtype == x.dtype
    assert torch.allclose(got, expected, atol=0.02 * expected.abs().max().item())


def test_a_loaded_int8_weight_is_64_byte_aligned_for_the_kernel():
    # safetensors hands out tensors at 8-byte offsets of one buffer and `load_model` assigns them as they are;
    # the int8 kernel's AVX-512 path crashed the process on such a weight (8 rows, offset 40). Same values.
    source = QuantizedLinear.from_linear(nn.Linear(96, 40))
    buffer = torch.zeros(96 * 40 + 64, dtype=torch.int8)
    offset = next(i for i in range(64) if (buffer.data_ptr() + i) % 64 == 40)
    misaligned = buffer[offset : offset + 96 * 40].view(40, 96)
    misaligned.copy_(source.weight)
    assert misaligned.data_ptr() % 64 == 40
    layer = QuantizedLinear.empty(40, 96, bias=True)
    layer.load_state_dict({**source.state_dict(), "weight": misaligned}, assign=True)
    assert layer.weight.data_ptr() % quant.ALIGNMENT == 0 and torch.equal(layer.weight, source.weight)
    x = torch.randn(8, 96)
    assert torch.equal(layer(x), source(x))


def test_quantize_int8_swaps_every_linear_and_unties_the_output_projection():
    model = build_model("gpt-tiny").eval()
    embedding = model.tok_emb.weight.detach().clone()
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantizedLinear)
    assert torch.equal(model.tok_emb.weight, embedding)  # the input embedding keeps its float table
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
