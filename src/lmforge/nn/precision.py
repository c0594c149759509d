"""bf16 training on CPUs that have no bf16 products: the same numbers at fp32 speed.

Under `torch.autocast("cpu", torch.bfloat16)` the matrix products (linear, matmul, bmm, ...) and attention take
bf16 operands. A CPU with AVX512-BF16 or AMX multiplies those natively (oneDNN: 2-4x its fp32 rate); an AVX2 CPU
has no such instruction, and PyTorch emulates each product in software, ~20x slower than fp32 (measured on 2
AVX2 cores: a 6 x 384 GPT's step over 8 x 256 tokens 26.8 s under bf16 autocast against 1.17 s in fp32).

The emulation buys nothing numerically. A bf16 number has an 8-bit significand, so the product of two is exact
in fp32's 24 bits, and the bf16 GEMMs accumulate in fp32 before they round the result to bf16 once:

    bf16_mm(A, B) = round_bf16( sum_k a_ik b_kj  in fp32 ),   a, b the bf16-rounded operands

which is what an fp32 GEMM computes on the same operands widened to fp32, then rounded (up to the order of the
fp32 additions, which differs between any two GEMM kernels anyway). `WidenedBf16` runs every product autocast
would give bf16 operands that way: the operands rounded to bf16 (as autocast rounds them), widened, multiplied by
MKL's fp32 GEMM, the result rounded to bf16. The backward does the same with the gradients, which are rounded to
bf16 where autocast's own backward rounds them (at each product's output). `WidenedLinear` keeps its input and
weight in bf16 for the backward, as autocast does, so activation memory stays bf16's.

What is left of bf16 on such a CPU is the memory it saves and results that agree with a bf16 run on hardware
that has it; the products cost fp32's time plus the roundings. `cpu_has_native_bf16` tells the two apart.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

BF16 = torch.bfloat16
PLAIN = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (x86 AVX512-BF16 or AMX-BF16, read from the Linux
    /proc/cpuinfo flags): there oneDNN's bf16 GEMM runs at 2-4x the fp32 rate (measured 943 vs 214 GFLOP/s on
    2 AVX512-BF16 cores); elsewhere PyTorch emulates bf16 through fp32 and is slower than fp32 itself."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to bf16, then held in `dtype` (a no-op for what is bf16 already and stays so)."""
    return t.to(BF16).to(dtype)


class WidenedLinear(torch.autograd.Function):
    """y = round_bf16(x_b W_b^T + b_b), x_b, W_b, b_b the operands rounded to bf16, the product in fp32.

    Backward, with g the bf16 gradient of y (all products in fp32, each result rounded to bf16 as autocast's
    bf16 GEMMs round theirs, then returned in the dtype of the input it belongs to):

        dx = round_bf16(g W_b),   dW = round_bf16(g^T x_b),   db = round_bf16(sum_rows g)

    Saves x_b and W_b in bf16 (autocast saves the same casts)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_b, w_b = x.to(BF16), weight.to(BF16)
        ctx.save_for_backward(x_b, w_b)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        b = None if bias is None else _round(bias, torch.float32)
        return F.linear(x_b.float(), w_b.float(), b).to(BF16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_b, w_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _round(g @ w_b.float(), x_dtype)
        if ctx.needs_input_grad[1]:
            dw = _round(g.reshape(-1, g.shape[-1]).T @ x_b.reshape(-1, x_b.shape[-1]).float(), w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = _round(g.reshape(-1, g.shape[-1]).sum(0), b_dtype)
        return dx, dw, db


def _products() -> frozenset:
    """The functions whose floating operands CPU autocast casts to bf16 (its lower-precision list, as lmforge's
    models and peft's layers call them)."""
    functions = [torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.einsum]
    methods = [torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm]
    methods += [torch.Tensor.bmm, torch.Tensor.baddbmm, torch.Tensor.addmm]
    return frozenset([F.linear, *functions, *methods, F.scaled_dot_product_attention])


class WidenedBf16(TorchFunctionMode):
    """While bf16 CPU autocast is on, compute its bf16 products as `WidenedLinear` does (module docstring): linear
    through `WidenedLinear`; matmul, bmm, einsum, attention and the rest of autocast's list on their floating
    operands rounded to bf16 and widened, autocast off, the result rounded to bf16 (their backward runs on the
    widened copies, and autograd rounds each gradient to bf16 where the rounding cast sits). Anything else, and
    everything with autocast off (a region that turned it off, e.g. lmforge's fp32 attention), passes through.
    So does a `torch.compile`d model: dynamo does not carry a Python mode into its graphs (measured: a compiled
    Linear ran at the emulation's speed with the mode on), so a compiled bf16 run here stays emulated."""

    PRODUCTS = _products()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling() or func not in self.PRODUCTS:  # (dynamo: before the set lookup)
            return func(*args, **kwargs)
        if not _autocast_bf16() or not _plain_cpu(args, kwargs):
            return func(*args, **kwargs)  # a DTensor (tensor parallelism) or another device: autocast's way
        with torch.autocast("cpu", enabled=False):
            if func is F.linear:
                x, weight, *rest = args
                return WidenedLinear.apply(x, weight, rest[0] if rest else kwargs.get("bias"))
            args, kwargs = tree_map(_widen, (args, kwargs))
            out = func(*args, **kwargs)
        return tree_map(lambda t: t.to(BF16) if _floating(t) else t, out)


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16


def _plain_cpu(args: tuple, kwargs: dict) -> bool:
    """Every tensor argument a plain CPU tensor or parameter (no DTensor or other subclass), the first floating."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return (
        bool(tensors)
        and tensors[0].is_floating_point()
        and all(type(t) in PLAIN and t.device.type == "cpu" for t in tensors)
    )


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _widen(t):
    return _round(t, torch.float32) if _floating(t) else t


def bf16_product_dtype(device: torch.device) -> torch.dtype:
    """The dtype bf16 autocast's products run in on `device` with `bf16_autocast`: bf16 where the hardware has
    it, fp32 on a CPU without (so MFU is measured against the fp32 matmul peak there, not the emulation's)."""
    return torch.float32 if device.type == "cpu" and not cpu_has_native_bf16() else BF16


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`; on a CPU without bf16 products, with its products widened (`WidenedBf16`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=BF16))
    if device.type == "cpu" and not cpu_has_native_bf16():
        stack.enter_context(WidenedBf16())
    return stack
