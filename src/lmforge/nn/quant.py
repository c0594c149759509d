"""Weight-only int8 quantisation of linear layers, for faster decoding.

Decoding one token at a time reads every weight once per step and does little arithmetic with it, so its
speed is bound by memory bandwidth: storing weights in 1 byte instead of 4 (fp32) or 2 (bf16) makes the
step up to 4x (2x) faster. Activations stay in floating point ("weight-only").

Each output channel (row i of W, shape (out, in)) gets its own scale, symmetric around zero:

    s_i = max_j |W_ij| / 127,    Q_ij = round(W_ij / s_i) in [-127, 127],    W_ij ~= s_i Q_ij

so y = x W^T + b = (x Q^T) * s + b: the scale factors out of the dot product and is applied to the output.
The rounding error per weight is at most s_i / 2; a row's scale follows its own largest entry, so one
large row does not cost the others their precision (per-tensor scales would).

For a few rows (decoding: one token per sequence) on CPU the product runs in `torch._weight_int8pack_mm`
(int8 weights, bf16 activations; PyTorch's kernel for this exact case). For many rows (a prompt's prefill)
the step is compute-bound and that kernel is slower than a dense GEMM, so the weight is converted to the
activations' dtype (exact: integers up to 127 fit bf16's 8-bit mantissa) and the scale applied to the output.

bf16 weights are not quantised but can be packed: oneDNN, which runs PyTorch's bf16 matmuls on CPU, computes on
a blocked weight layout, and `PackedLinear` stores the weight in it once (what inductor's freezing pass does)
instead of handing oneDNN the plain (out, in) matrix on every call. Same bits out, ~1.5-2x faster for 1-8 rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.kernels import (
    int4_dequantize,
    int4_matvec,
    int8_matvec,
    kernel_fast,
    matvec,
    matvec_layout,
    pairs_linear,
    pairs_pack,
)

QMAX = 127
ALIGNMENT = 64  # bytes: an AVX-512 register, and what PyTorch's CPU allocator guarantees
KERNEL_MAX_ROWS = 16  # above this many rows a dense GEMM on the converted weight is faster (measured)
MATVEC_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4}
"""`MatvecLinear` runs its kernel up to this many rows; above, MKL's fp32 and oneDNN's bf16 GEMMs are as fast or
faster (measured on SmolLM2 and GPT-2 shapes, 2 threads: the kernel's cost grows with the rows, a GEMM's barely)."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, where oneDNN's bf16 GEMM runs near the fp32 one's
    speed or above). Without it (AVX2), PyTorch's bf16 GEMM is an emulation: SmolLM2's 30 blocks of Linears at 16
    rows took 135 ms in bf16 against 50 on lmforge's matvec kernel, and a 128-token prefill ~3x longer than the
    same product in fp32 (MKL) on the weights widened for the call. Decoding layers then run their prefills in
    fp32 and the bf16 matvec kernel up to `KERNEL_MAX_ROWS` rows."""
    return kernel_fast("pairs")


def prefill_dtype() -> torch.dtype:
    """The dtype of a prefill's dense GEMM on a decoding layer's weight: bf16 where the CPU has native bf16
    products, else fp32 (`native_bf16`). int8 and int4 codes, and bf16 weights, are exact in either."""
    return torch.bfloat16 if native_bf16() else torch.float32


PAIRS_MAX_ROWS = 64
"""A bf16 `MatvecLinear` with its pair-interleaved copy (`pack()`) runs `pairs_linear` up to this many rows; it
ties oneDNN's packed GEMM at 32-64 rows and beats it below (SmolLM2 shapes, cache-cold, 2 threads: 16 rows of
1536 x 576 in 128 us against 161, 8 rows 95 against 132), so a prefill's hundreds of rows keep `F.linear`."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> (Q int8 (out, in), s fp32 (out,)) with W ~= s[:, None] * Q."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / QMAX
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def _has_int8pack_kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as int8 with one fp32 scale per output channel."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight", weight_int8.contiguous())
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.matvec = False  # set by `use_matvec_kernel`

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool) -> QuantizedLinear:
        """A shell of the right shapes, to be filled by `load_state_dict`."""
        weight = torch.zeros(out_features, in_features, dtype=torch.int8)
        return cls(weight, torch.ones(out_features), torch.zeros(out_features) if bias else None)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.weight.data_ptr() % ALIGNMENT:
            # `load_state_dict(assign=True)` keeps the loaded tensor, and safetensors places tensors on 8-byte
            # offsets of one buffer; `_weight_int8pack_mm`'s AVX-512 path reads the weight with aligned loads
            # and dies with a general protection fault on such a tensor (seen: 8 rows, offset 40). A fresh
            # tensor from PyTorch's allocator is 64-byte aligned.
            self.weight = self.weight.clone()
        self.scale_bf16 = self.scale.to(torch.bfloat16)  # not saved: follows the loaded scale

    def use_matvec_kernel(self) -> bool:
        """Run products of up to KERNEL_MAX_ROWS rows (decoding) in lmforge's int8 kernel (`lmforge.nn.kernels`:
        activations rounded to int8 per block of 32, as llama.cpp's Q8 blocks; ~2x faster than
        `_weight_int8pack_mm` on SmolLM2's 49152 x 576 output projection: 1.1-1.3 against 2.3-3.4 ms). False,
        leaving the layer on `_weight_int8pack_mm`, where it cannot run or would not be fast (no compiler,
        a CPU with neither AVX-512 VNNI nor AVX2, a width that is not a multiple of 32, a weight off the CPU).
        It reads the layer's own buffers: no copy."""
        fits = self.in_features % 32 == 0 and self.weight.device.type == "cpu"
        self.matvec = fits and kernel_fast("int8")
        self.prefill_dtype = prefill_dtype()  # read in forward as a plain attribute (a compiled step guards it)
        return self.matvec

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.matvec and rows <= KERNEL_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu:
            y = int8_matvec(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scale)
            y = y.view(*x.shape[:-1], self.out_features)
        elif x.device.type == "cpu" and rows <= KERNEL_MAX_ROWS and _has_int8pack_kernel():
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (N, in)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale_bf16)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        elif self.matvec and x.is_cpu:
            # a prefill on a decoding layer: a bf16 GEMM (int8 codes are exact in bf16; the activations round
            # to bf16, as on the decoding path) on half the bytes of an fp32 weight converted for the call; fp32
            # where the CPU has no native bf16 products (`prefill_dtype`)
            dtype = self.prefill_dtype
            y = F.linear(x.to(dtype), self.weight.to(dtype)).to(x.dtype) * self.scale.to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def has_packed_bf16_kernel() -> bool:
    """Whether this PyTorch build and CPU run oneDNN's prepacked bf16 linear (`torch.ops.mkldnn._linear_pointwise`).

    The build may have the op while the CPU lacks the instructions its bf16 path needs (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT): oneDNN then refuses at packing time, so one tiny weight is packed and run to find out."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        weight = torch.zeros(16, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=torch.bfloat16), packed, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """An inference-only bf16 Linear on CPU whose weight is held in oneDNN's blocked layout.

    The packed weight is an opaque oneDNN tensor: it has no state_dict entry and does not follow `.to()`, so
    pack a model after loading it and only to run it. The packing is chosen for one row (decoding) and serves
    any number of rows (a prefill of 32 rows is still ~1.5x faster than `F.linear`; measured on GPT-2 shapes).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MatvecLinear(nn.Linear):
    """An fp32 or bf16 `nn.Linear` on CPU whose products of a few rows (decoding; `MATVEC_MAX_ROWS`) run in
    lmforge's `matvec` kernel, and larger ones (a prefill) in `F.linear` as before.

    At one row a Linear is bound by streaming its weight from memory; the kernel reads it front to back, one
    sequential run per thread, at 25-30 GB/s where oneDNN (bf16) and MKL (fp32) reach 10-22 (SmolLM2 and GPT-2
    shapes, 2 threads; `lmforge.nn.kernels`). It holds the Linear's own weight and bias Parameters, so the
    state_dict, a tied embedding and `.to()` are as they were; results agree with `F.linear` to rounding (fp32
    sums in another order). Inference only: with gradients needed it runs `F.linear`.

    Steps of more rows than the kernel takes (a server's batched steps) are compute-bound. `pack()` adds a second,
    pair-interleaved copy of a bf16 weight (`pairs_pack`: twice the weight's memory, not in the state_dict) on
    which `pairs_linear` runs steps of 2 to `PAIRS_MAX_ROWS` rows with every weight load serving up to 16 rows
    (SmolLM2-135M, a 16-row step's Linears: ~1.3-1.6x faster than oneDNN's own packed GEMM, which this replaced).
    The copy is made again when the weight has changed since (`load_state_dict`, an in-place update: the tensor's
    version counter); a compiled graph reads it as it was when traced (compile after `pack`).

    A CPU without native bf16 products (AVX2; `native_bf16`) has no pair copy, and PyTorch's bf16 GEMM is an
    emulation there: bf16 steps of up to `KERNEL_MAX_ROWS` rows stay on the matvec kernel (2.7x F.linear at 8 and
    16 rows, SmolLM2 shapes), and prefills run an fp32 GEMM on the weight widened for the call (each bf16
    product is exact in fp32, as in a native bf16 GEMM), rounded to bf16 once."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed: torch.Tensor | None = None
        self.packed_from: tuple | None = None  # the weight the packed copy was made of: storage and version
        self.native_bf16 = native_bf16()

    def _weight_state(self) -> tuple:
        # a weight made under torch.inference_mode (`lmforge generate` loads its model there) has no version
        # counter: its copy is remade when the tensor is swapped, not when it is edited in place
        version = None if self.weight.is_inference() else self.weight._version
        return (self.weight.data_ptr(), version, self.weight.dtype)

    def pack(self) -> bool:
        """Keep `pairs_pack`'s copy of a bf16 weight for steps of many rows; False where there is none to keep
        (fp32, or a CPU without AVX512-BF16, where the kernel would run plain loops)."""
        if self.weight.dtype != torch.bfloat16 or not self.weight.is_cpu or not kernel_fast("pairs"):
            self.packed = self.packed_from = None
        elif self.packed is None or self.packed_from != self._weight_state():
            self.packed = pairs_pack(self.weight.detach())
            self.packed_from = self._weight_state()
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        inference = not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        if inference and x.is_cpu and x.dtype == self.weight.dtype:
            # (`pack` makes the copy again if the weight changed; a traced graph reads it as traced)
            paired = self.packed is not None and 1 < rows <= PAIRS_MAX_ROWS
            if paired and (torch.compiler.is_compiling() or self.pack()):
                flat = x.reshape(rows, self.in_features).contiguous()
                y = pairs_linear(flat, self.packed, self.bias, self.out_features)
                return y.view(*x.shape[:-1], self.out_features)
            emulated = x.dtype == torch.bfloat16 and not self.native_bf16  # PyTorch's bf16 GEMM is slow there
            limit = KERNEL_MAX_ROWS if emulated else MATVEC_MAX_ROWS.get(x.dtype, 0)
            if rows <= limit and self.weight.is_contiguous():
                y = matvec(x.reshape(rows, self.in_features).contiguous(), self.weight, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            if emulated:  # a prefill: fp32 GEMM on the weight widened for the call, one rounding to bf16
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` by a QuantizedLinear, in place; returns the model.

    A tied output projection gets its own int8 copy while the input embedding keeps its float table
    (an embedding lookup reads one row per token, so it is not worth quantising).
    """
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, QuantizedLinear.from_linear(child))
        else:
            quantize_int8(child)
    return model


INT4_MAX = 15  # 4-bit codes q in [0, 15]; the kernels store q - 8 around zero


def int4_group_params(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max grid of each row of `weight` (rows, g): (scale, zero) with w ~= (q - 8) scale + zero.

    With lo = min(w, 0) and hi = max(w, 0) (the grid always holds 0 exactly), scale = (hi - lo) / 15 and
    q = round((w - lo) / scale) in [0, 15], so w ~= q scale + lo = (q - 8) scale + (lo + 8 scale): zero is the
    value of the middle code 8, the convention of PyTorch's int4 kernels (tinygemm)."""
    w = weight.float()
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / INT4_MAX).clamp(min=1e-8)
    return scale, lo + 8 * scale


CLIP_RATIOS = torch.linspace(1.0, 0.75, 26)
"""The shrink factors `int4_clipped_group_params` tries: the grid's range scaled by 1.00, 0.99, ..., 0.75."""


def int4_clipped_group_params(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max grid of `int4_group_params` with its range [lo, hi] shrunk by the factor p in `CLIP_RATIOS`
    that minimises each row's squared rounding error sum_j (w_j - dq(w_j))^2.

    Why: min-max spends the 16 levels on the group's extremes; a slightly narrower grid clips one or two outliers
    but rounds the other 62 weights on finer steps, and usually wins. The reference GPTQ code's `mse` option
    and llama.cpp's quantisers search the range the same way. p = 1 is a candidate, so the error is never
    larger than min-max's; 0 stays on the grid (lo <= 0 <= hi for every p)."""
    w = weight.float()
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    p = CLIP_RATIOS.to(w.device)[:, None]  # (P, 1)
    scale = ((hi - lo) * p / INT4_MAX).clamp(min=1e-8)  # (P, rows)
    zero = lo * p + 8 * scale
    codes = int4_codes(w[None], scale[..., None], zero[..., None])  # (P, rows, g)
    error = ((codes - 8) * scale[..., None] + zero[..., None] - w[None]).pow(2).sum(dim=-1)  # (P, rows)
    best = error.argmin(dim=0)  # (rows,)
    rows = torch.arange(w.shape[0], device=w.device)
    return scale[best, rows], zero[best, rows]


def int4_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q = round((w - zero) / scale) + 8, clamped to [0, 15]; scale and zero broadcast against `weight`."""
    return (torch.round((weight.float() - zero) / scale) + 8).clamp(0, INT4_MAX)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, column 2j in the low nibble and 2j + 1 in the high one."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def has_int4pack_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear(nn.Module):
    """A Linear whose weight is stored in 4 bits, group-wise: each run of `group_size` consecutive inputs of an
    output row has its own scale and zero, W_ij ~= (Q_ij - 8) s_{i,g(j)} + z_{i,g(j)} (g(j) = j // group_size).

    Stored (the state_dict, what a quantised checkpoint saves): `weight` (out, in/2) uint8, two codes a byte
    (`pack_nibbles`), `scale` and `zero` (out, in/group_size) fp32. On CPU the product runs in PyTorch's int4
    kernel `_weight_int4pack_mm_for_cpu` (the codes reordered once, on first use, into its own packed layout by
    `_convert_weight_to_int4pack_for_cpu`; it unpacks each group's codes in registers, so the weight is read
    in 4 bits per step and never materialised in floating point). Elsewhere the weight is dequantised to the
    activations' dtype and multiplied (a fallback, as fast as a float Linear at best).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("weight", pack_nibbles(codes))
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._kernel_weight: torch.Tensor | None = None
        self._kernel_params: dict[torch.dtype, torch.Tensor] = {}
        self._matvec: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, bias: bool) -> Int4Linear:
        """A shell of the right shapes, to be filled by `load_state_dict`."""
        groups = in_features // group_size
        return cls(
            torch.zeros(out_features, in_features, dtype=torch.uint8),
            torch.ones(out_features, groups),
            torch.zeros(out_features, groups),
            torch.zeros(out_features) if bias else None,
        )

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._kernel_weight, self._kernel_params = None, {}  # new codes: repack on next use
        use_matvec = self._matvec is not None
        self._matvec = None
        super()._load_from_state_dict(*args, **kwargs)
        if use_matvec:
            self.use_matvec_kernel()

    def use_matvec_kernel(self) -> bool:
        """Run products of up to KERNEL_MAX_ROWS rows (decoding) in lmforge's own int4 kernel
        (`lmforge.nn.kernels`: int8-rounded activations, ~1.5x faster than `_weight_int8pack_mm` on SmolLM2's
        layers); False, leaving the layer as it was, where the kernel cannot run or would not be fast (no
        compiler, a CPU with neither AVX-512 VNNI nor AVX2, a width that is not a multiple of 64, a group size
        that is not a power of two >= 32). Its own copy of the weight (the kernel's layout, fp16 scales) is made
        here, once."""

        fits = self.in_features % 64 == 0 and self.group_size >= 32 and self.group_size & (self.group_size - 1) == 0
        if not (fits and self.weight.device.type == "cpu" and kernel_fast("int4")):
            return False
        self._matvec = matvec_layout(unpack_nibbles(self.weight), self.scale, self.zero)
        self.prefill_dtype = prefill_dtype()
        return True

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_nibbles(self.weight).to(dtype)
        scale = self.scale.repeat_interleave(self.group_size, dim=1).to(dtype)
        zero = self.zero.repeat_interleave(self.group_size, dim=1).to(dtype)
        return (codes - 8) * scale + zero

    def kernel_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, scales_and_zeros (in/group, out, 2) in `dtype`) for `_weight_int4pack_mm_for_cpu`."""
        if self._kernel_weight is None:
            codes = unpack_nibbles(self.weight).to(torch.int32)
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if dtype not in self._kernel_params:
            self._kernel_params[dtype] = torch.stack([self.scale.t(), self.zero.t()], dim=-1).to(dtype).contiguous()
        return self._kernel_weight, self._kernel_params[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        on_kernel = self._matvec is not None and x.is_cpu
        if on_kernel and rows <= KERNEL_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            codes, scale, minimum = self._matvec
            flat = x.reshape(-1, self.in_features).contiguous()
            y = int4_matvec(flat, codes, scale, minimum, self.group_size)
            y = y.view(*x.shape[:-1], self.out_features)
        elif on_kernel:
            # a prefill on a decoding layer: compute-bound, where a dense bf16 product on the weight dequantised
            # for this call (by the kernel library, ~10x the tensor ops) beats PyTorch's int4 kernel by far
            # (SmolLM2, 128-token prompt: ~0.16 s against 11.8 s)
            codes, scale, minimum = self._matvec
            weight = int4_dequantize(codes, scale, minimum, self.group_size).to(self.prefill_dtype)
            y = F.linear(x.to(self.prefill_dtype), weight).to(x.dtype)
        elif x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and has_int4pack_kernel():
            weight, params = self.kernel_operands(x.dtype)
            flat = x.reshape(-1, self.in_features).contiguous()  # (N, in)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight, self.group_size, params)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )


SHELLS = {
    "int8": lambda linear, config: QuantizedLinear.empty(
        linear.out_features, linear.in_features, linear.bias is not None
    ),
    "int4": lambda linear, config: Int4Linear.empty(
        linear.out_features, linear.in_features, config["group_size"], linear.bias is not None
    ),
}
"""Quantisation method (a checkpoint's `quantization.method`) -> the empty layer that replaces a Linear before
the checkpoint's tensors are loaded into it."""
