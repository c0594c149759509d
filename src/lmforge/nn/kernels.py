"""lmforge's own C++ CPU kernels, built on first use with `torch.utils.cpp_extension` (g++ and ninja).

Only where PyTorch has no kernel as fast (`csrc/matvec.cpp`, which gives the math): the products of a few
activation rows with a weight that decoding runs, `lmforge::int4_matvec` (4-bit grouped weights, where
PyTorch's CPU int4 kernel decodes slower than its int8 one), `lmforge::int8_matvec` (int8 weights with a
scale per output row, where `_weight_int8pack_mm` streams the weights at well under memory bandwidth) and
`lmforge::matvec` (fp32 or bf16 weights as nn.Linear holds them, where MKL and oneDNN stream them at 10-22
GB/s against the kernel's 25-30); and `lmforge::decode_attention`, a decoding step's attention, where SDPA's
set-up dominates at a few rows. The build takes ~10 s once per machine and source version; torch caches the
library under `~/.cache/torch_extensions` (or `$TORCH_EXTENSIONS_DIR`). Without a compiler,
`kernels_available()` is False (with one warning) and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "matvec.cpp"


@functools.cache
def kernels_available() -> bool:
    """Build (once) and load lmforge's kernels; False, with a warning, where they cannot be built."""
    if hasattr(torch.ops.lmforge, "matvec"):
        return True
    try:
        from torch.utils import cpp_extension

        if _needs_build(cpp_extension):
            print("lmforge: building its decoding kernels (once per machine and version, ~10 s)", file=sys.stderr)
        cpp_extension.load(
            name="lmforge_matvec",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, an unsupported platform: PyTorch's kernels remain
        warnings.warn(f"lmforge's decoding kernels could not be built ({error}); using PyTorch's", stacklevel=2)
        return False

    @torch.library.register_fake("lmforge::int4_matvec")
    def _(x, codes, scale, minimum, group_size):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lmforge::int8_matvec")
    def _(x, codes, scale):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lmforge::int4_dequantize")
    def _(codes, scale, minimum, group_size):
        return codes.new_empty(codes.shape[0], codes.shape[1] * 2, dtype=torch.bfloat16)

    @torch.library.register_fake("lmforge::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("lmforge::matvec")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lmforge::pairs_pack")
    def _(weight):
        return weight.new_empty((weight.shape[0] + 15) // 16, (weight.shape[1] + 1) // 2, 16, 2)

    @torch.library.register_fake("lmforge::pairs_linear")
    def _(x, packed, bias, out_features):
        return x.new_empty(x.shape[0], out_features)

    return True


FAST_PATHS = {"fp32": 1, "bf16": 2, "int8": 4, "int4": 4, "attention": 1, "pairs": 8}
"""The bit of `lmforge::capabilities` each kernel's fast path sets: fp32 matvec and attention (AVX-512 or AVX2 with
FMA), bf16 matvec (AVX512-BF16 or AVX2: bf16 widened to fp32), int8 and int4 (AVX-512 VNNI or AVX2's
vpmaddubsw), `pairs_linear` (AVX512-BF16 alone). The library is compiled for the machine it runs on; where a bit
is missing, that kernel would run plain loops, slower than PyTorch's, so callers keep PyTorch's kernels there."""


@functools.cache
def kernel_fast(kind: str) -> bool:
    """Whether lmforge's kernel for `kind` ("fp32", "bf16", "int8", "int4", "attention") builds here and runs
    its vector path on this CPU."""
    return kernels_available() and bool(torch.ops.lmforge.capabilities() & FAST_PATHS[kind])


def _needs_build(cpp_extension) -> bool:
    """Whether `cpp_extension.load` will compile (no library built from this source yet), so that the wait is
    announced only when there is one."""
    try:
        built = Path(cpp_extension._get_build_directory("lmforge_matvec", False)) / "lmforge_matvec.so"
        return not built.exists() or built.stat().st_mtime < SOURCE.stat().st_mtime
    except Exception:  # a private helper of torch: if it moves, announce every load rather than none
        return True


def int4_matvec(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int
) -> torch.Tensor:
    """y = x W^T for x (rows, K) float32/bf16 and W stored by `matvec_layout` (see the C++ source for the math)."""
    return torch.ops.lmforge.int4_matvec(x, codes, scale, minimum, group_size)


def int8_matvec(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x W^T for x (rows, K) float32/bf16, K a multiple of 32, and W = scale[:, None] * codes, codes (N, K)
    int8 and scale (N,) fp32 (`QuantizedLinear`'s buffers as they are)."""
    return torch.ops.lmforge.int8_matvec(x, codes, scale)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for x (rows, K) and W (N, K) as `nn.Linear` holds them, all fp32 or all bf16 (bf16:
    products exact in fp32, fp32 sums, one rounding at the end; see the C++ source)."""
    return torch.ops.lmforge.matvec(x, weight, bias)


def pairs_pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight (N, K) as `pairs_linear` reads it: (ceil(N/16), ceil(K/2), 16, 2), P[b, p, j, e] =
    W[16 b + j, 2 p + e], zero past N and K (a second copy of the weight; see the C++ source)."""
    return torch.ops.lmforge.pairs_pack(weight)


def pairs_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x W^T + b for bf16 x (rows, K) and W held as `pairs_pack(W)`: products exact in fp32, fp32 sums, one
    rounding to bf16; for steps of a few to a few dozen rows, where it is compute-bound."""
    return torch.ops.lmforge.pairs_linear(x, packed, bias, out_features)


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    """W = q s + m in bf16, (N, K), from `matvec_layout`'s codes, scales and minimums: a prefill's weight."""
    return torch.ops.lmforge.int4_dequantize(codes, scale, minimum, group_size)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T scale + mask) v for the few query rows of each head at a decoding step: q (B, H, R, D)
    with R <= 8, k and v (B, H, S, D), D a multiple of 16, all float32 or all bf16 (computed in fp32); mask
    additive (B, 1, 1, S) in their dtype, or None (see the C++ source)."""
    return torch.ops.lmforge.decode_attention(q, k, v, mask, scale)


def matvec_layout(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Int4Linear`'s codes (N, K) in [0, 15], scale and zero (N, K/g), W = (q - 8) s + z, as the kernel reads
    them: codes (N, K/2) uint8 where, per 64 inputs, byte i holds input i (low nibble) and 32 + i (high), and
    W = q s + m with s and m = z - 8 s in fp16 (N, K/g)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 64, 2, 32)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return packed, scale.half().contiguous(), (zero - 8 * scale).half().contiguous()
