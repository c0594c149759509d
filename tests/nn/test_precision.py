"""bf16 products computed in fp32 on CPUs without bf16 hardware (lmforge.nn.precision), held to PyTorch's own bf16
autocast (its emulation) as the oracle."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lmforge.models import build_model
from lmforge.nn import precision
from lmforge.nn.precision import WidenedBf16, WidenedLinear, bf16_autocast


def _linear_grads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, widened: bool):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    with torch.autocast("cpu", torch.bfloat16):
        if widened:
            with WidenedBf16():
                y = F.linear(x, weight, bias)
        else:
            y = F.linear(x, weight, bias)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y, x.grad, weight.grad, bias.grad


def test_a_linear_computes_what_bf16_autocast_computes_and_rounds_its_gradients_alike():
    """Forward and the three gradients against PyTorch's bf16 autocast: bf16 output and bf16-valued gradients in
    the inputs' dtypes, equal to within one bf16 rounding (the fp32 sums may run in another order); exactly equal
    where every sum is exact (small integers)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 64), torch.randn(48, 64), torch.randn(48)
    ours, oracle = _linear_grads(x, weight, bias, True), _linear_grads(x, weight, bias, False)
    assert ours[0].dtype == torch.bfloat16
    for got, want in zip(ours, oracle, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, got.to(torch.bfloat16).to(got.dtype))  # bf16 values
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5)
    ints = [torch.randint(-4, 5, shape).float() for shape in ((2, 7, 32), (16, 32), (16,))]
    for got, want in zip(_linear_grads(*ints, True), _linear_grads(*ints, False), strict=True):
        assert torch.equal(got.float(), want.float())


def test_a_linear_keeps_bf16_for_the_backward_and_skips_a_frozen_weights_gradient():
    """Activation memory as autocast's: the tensors kept for the backward are bf16; a frozen weight (a LoRA base)
    gets no gradient computed."""
    saved = []
    weight = torch.randn(32, 16)  # frozen
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = WidenedLinear.apply(x, weight, None)
    y.float().sum().backward()
    assert saved == [torch.bfloat16, torch.bfloat16]
    assert weight.grad is None and x.grad.dtype == torch.float32


def _count(node, name: str, seen: set | None = None) -> int:
    """Nodes called `name` in the autograd graph below `node`."""
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return 0
    seen.add(node)
    return (name in node.name()) + sum(_count(child, name, seen) for child, _ in node.next_functions)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_models_training_gradients_match_bf16_autocast(family):
    """A whole training step's loss and gradients (lmforge's short-sequence attention, which runs in fp32 under
    either) against PyTorch's bf16 autocast: most gradient elements bit for bit (62-100% over four seeds; a sum
    taken in another order sometimes rounds to the neighbouring bf16, and that spreads), where fp32 training's
    match under 3%: the gradients are bf16's, not fp32's."""
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if family == "llama" else {}
    model = build_model(family, n_layer=2, n_head=4, d_model=64, vocab_size=97, max_seq_len=32, dropout=0.0, **extra)
    ids = torch.randint(0, 97, (2, 32))

    def gradients(mode: str) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=mode != "fp32"):
            with WidenedBf16() if mode == "widened" else contextlib.nullcontext():
                logits = model(ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97).float(), ids[:, 1:].reshape(-1))
        if mode == "widened":  # every Linear of the model went through WidenedLinear
            assert _count(loss.grad_fn, "WidenedLinearBackward") == linears
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())

    (loss, ours), (loss_oracle, oracle), (_, fp32) = gradients("widened"), gradients("autocast"), gradients("fp32")
    assert loss == pytest.approx(loss_oracle, abs=1e-4)
    assert (ours == oracle).float().mean() > 0.5  # bit for bit, but where a sum in another order rounded apart
    assert (fp32 == oracle).float().mean() < 0.05


def test_attention_and_matmuls_take_bf16_operands_and_round_once():
    """The products other than linear (attention past the short path, matmul): the operands rounded to bf16,
    the fp32 result rounded to bf16 once."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 160, 16) for _ in range(3))
    a, b = torch.randn(8, 24), torch.randn(24, 4)
    with torch.autocast("cpu", torch.bfloat16), WidenedBf16():
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        product = a @ b
    r = [t.to(torch.bfloat16).float() for t in (q, k, v, a, b)]
    assert torch.equal(attended, F.scaled_dot_product_attention(*r[:3], is_causal=True).to(torch.bfloat16))
    assert torch.equal(product, (r[3] @ r[4]).to(torch.bfloat16))


def test_the_mode_steps_aside_where_autocast_is_off():
    """A region that turns autocast off (lmforge's fp32 attention) and code outside autocast get fp32 products."""
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with WidenedBf16():
        assert F.linear(x, w).dtype == torch.float32
        with torch.autocast("cpu", torch.bfloat16):
            with torch.autocast("cpu", enabled=False):
                assert torch.equal(F.linear(x, w), x @ w.T)
            assert F.linear(x, w).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_widens_only_on_a_cpu_without_bf16_products(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    depth = torch._C._len_torch_function_stack()
    with bf16_autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch._C._len_torch_function_stack() == depth + (not native)
    assert torch._C._len_torch_function_stack() == depth and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("device", "native", "products"),
    [("cpu", False, torch.float32), ("cpu", True, torch.bfloat16), ("cuda", False, torch.bfloat16)],
)
def test_mfu_is_measured_against_the_dtype_bf16_products_run_in(monkeypatch, device, native, products):
    """A bf16 run's MFU denominator: the fp32 peak where lmforge widens the products, bf16's elsewhere (the
    emulation's ~1 GFLOP/s would read as thousands of percent)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.bf16_product_dtype(torch.device(device)) == products


_SEED = torch.Generator().manual_seed(0)
_A, _B, _C, _M1, _M2, _BIAS = (
    torch.randn(shape, generator=_SEED) for shape in ((4, 8, 16), (4, 16, 8), (4, 8, 8), (8, 16), (16, 8), (8,))
)


@pytest.mark.parametrize(
    "product",
    [
        lambda: torch.einsum("bij,bjk->bik", _A, _B),
        lambda: torch.baddbmm(_C, _A, _B),
        lambda: torch.addmm(_BIAS, _M1, _M2),
        lambda: _M1.__rmatmul__(_M2),
        lambda: _A.bmm(_B),
        lambda: torch.matmul(_A, _B),
    ],
    ids=["einsum", "baddbmm", "addmm", "rmatmul", "bmm", "matmul"],
)
def test_each_product_on_autocasts_list_equals_autocasts_result(product):
    """Small products whose fp32 sums every kernel takes alike: bit for bit PyTorch's bf16 autocast."""
    with torch.autocast("cpu", torch.bfloat16):
        want = product()
        with WidenedBf16():
            got = product()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
