"""lmforge's C++ decoding kernels (int4, int8, fp32/bf16 matvec, attention) against the math they claim, inside
Int4Linear, QuantizedLinear and MatvecLinear, and in a compiled step."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.nn import quant
from lmforge.nn.kernels import (
    decode_attention,
    int4_dequantize,
    int4_matvec,
    int8_matvec,
    kernel_fast,
    kernels_available,
    matvec,
    matvec_layout,
    pairs_linear,
    pairs_pack,
)
from lmforge.nn.quant import (
    MATVEC_MAX_ROWS,
    PAIRS_MAX_ROWS,
    Int4Linear,
    MatvecLinear,
    QuantizedLinear,
    int4_codes,
    int4_group_params,
    quantize_per_channel,
    unpack_nibbles,
)


def quantised_layer(out_features: int, in_features: int, group_size: int, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * 0.05
    groups = w.view(out_features, in_features // group_size, group_size)
    scale, zero = int4_group_params(groups.reshape(-1, group_size))
    scale, zero = scale.view(out_features, -1), zero.view(out_features, -1)
    codes = int4_codes(groups, scale[..., None], zero[..., None]).reshape(out_features, in_features)
    return Int4Linear(codes, scale, zero)


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 in float64: d = max |x| / 127, xq = round(x / d) (ties to even), d xq."""
    rows, k = x.shape
    xb = x.double().view(rows, k // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0.0)
    return (xq * d).view(rows, k)


def emulated(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """The kernel's arithmetic in float64: x rounded to int8 per block of 32, W = q s + m with s, m in fp16,
    the minimum's term taken on the unrounded x."""
    rounded = int8_rounded(x)
    s, m = layer.scale.half(), (layer.zero - 8 * layer.scale).half()  # W = (q - 8) s + z = q s + m
    codes = unpack_nibbles(layer.weight).double()
    g = layer.group_size
    s, m = s.double().repeat_interleave(g, 1), m.double().repeat_interleave(g, 1)
    return rounded @ (codes * s).T + x.double() @ m.T


needs_kernel = pytest.mark.skipif(not kernels_available(), reason="no C++ compiler to build the kernel")


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 5])
def test_kernel_computes_the_int4_x_int8_dot_product_it_documents(group_size, rows):
    layer = quantised_layer(200, 384, group_size)
    x = torch.randn(rows, 384)
    codes, scale, minimum = matvec_layout(unpack_nibbles(layer.weight), layer.scale, layer.zero)
    y = int4_matvec(x, codes, scale, minimum, group_size)
    ref = emulated(x, layer)
    assert y.shape == (rows, 200) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    yb = int4_matvec(x.bfloat16(), codes, scale, minimum, group_size)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), emulated(x.bfloat16().float(), layer), rtol=1e-2, atol=1e-2)


@needs_kernel
def test_int4_linear_on_the_kernel_stays_within_activation_rounding_of_the_dequantised_product():
    layer = quantised_layer(192, 576, 32)
    x = torch.randn(2, 3, 576)
    exact = F.linear(x, layer.dequantized_weight())
    on_kernel = kernel_fast("int4")  # the kernel where the CPU has its fast path (AVX-512 VNNI), else PyTorch's
    assert layer.use_matvec_kernel() == on_kernel
    y = layer(x)
    assert y.shape == exact.shape
    rel = (y - exact).norm() / exact.norm()
    assert rel < 1e-2 and (rel > 0 or not on_kernel)  # int8 activations: not bit-equal, within a percent
    many = torch.randn(40, 576)  # a prefill: more rows than the kernel takes, a GEMM on the bf16 dequantised weight
    # in bf16 where the CPU has native bf16 products, else in fp32 on the activations as they are (`prefill_dtype`)
    native = getattr(layer, "prefill_dtype", torch.bfloat16) == torch.bfloat16
    bf16 = F.linear(many.bfloat16().float() if native else many, layer.dequantized_weight().bfloat16().float())
    torch.testing.assert_close(layer(many), bf16, rtol=1e-2, atol=1e-2)  # bf16 rounding of the sums only
    rel = (layer(many) - F.linear(many, layer.dequantized_weight())).norm() / bf16.norm()
    assert rel < 1e-2


@needs_kernel
def test_layers_the_kernel_cannot_run_keep_pytorchs_path():
    assert not quantised_layer(8, 96, 32).use_matvec_kernel()  # width not a multiple of 64
    layer = quantised_layer(16, 128, 32)
    state = layer.state_dict()
    on_kernel = kernel_fast("int4")  # without AVX-512 VNNI every layer keeps PyTorch's path
    assert layer.use_matvec_kernel() == on_kernel
    layer.load_state_dict(state)  # reloaded codes are re-laid out for the kernel
    x = torch.randn(1, 128)
    expected = emulated(x, layer) if on_kernel else F.linear(x, layer.dequantized_weight()).double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_runs_inside_a_compiled_graph_with_the_eager_result():
    layer = quantised_layer(64, 128, 64)
    layer.use_matvec_kernel()
    x = torch.randn(1, 128)

    def step(t):
        return torch.nn.functional.silu(layer(t)) * 2

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(x), step(x))


@needs_kernel
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_gives_the_weight_the_kernel_multiplies_by(group_size):
    layer = quantised_layer(70, 256, group_size)
    codes, scale, minimum = matvec_layout(unpack_nibbles(layer.weight), layer.scale, layer.zero)
    weight = int4_dequantize(codes, scale, minimum, group_size)
    g = group_size
    expected = unpack_nibbles(layer.weight).float() * scale.float().repeat_interleave(g, 1)
    expected = expected + minimum.float().repeat_interleave(g, 1)
    assert weight.dtype == torch.bfloat16 and weight.shape == (70, 256)
    torch.testing.assert_close(weight, expected.bfloat16(), rtol=0, atol=0)  # one rounding, to bf16
    torch.testing.assert_close(weight.float(), layer.dequantized_weight(), rtol=1e-2, atol=2e-3)


@needs_kernel
def test_kernel_refuses_a_width_it_cannot_read():
    codes = torch.zeros(4, 48, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        int4_matvec(torch.randn(1, 96), codes, torch.ones(4, 3).half(), torch.zeros(4, 3).half(), 32)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernel_computes_the_int8_x_int8_dot_product_it_documents(rows):
    torch.manual_seed(0)
    codes, scale = quantize_per_channel(torch.randn(300, 416) * 0.05)
    codes[0, :40] = -128  # outside QuantizedLinear's own range, possible in a loaded checkpoint: still exact
    x = torch.randn(rows, 416)
    ref = int8_rounded(x) @ (codes.double() * scale.double()[:, None]).T
    y = int8_matvec(x, codes, scale)
    assert y.shape == (rows, 300) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    yb = int8_matvec(x.bfloat16(), codes, scale)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(
        yb.double(), int8_rounded(x.bfloat16().float()) @ (codes * scale[:, None]).double().T, rtol=1e-2, atol=1e-2
    )
    with pytest.raises(RuntimeError, match="multiple of 32"):
        int8_matvec(torch.randn(1, 40), torch.zeros(3, 40, dtype=torch.int8), torch.ones(3))


@needs_kernel
def test_quantized_linear_on_the_int8_kernel_decodes_within_activation_rounding_and_compiles():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(96, 80))
    x = torch.randn(1, 2, 96)
    exact = F.linear(x, layer.dequantized_weight(), layer.bias)
    on_kernel = kernel_fast("int8")  # the kernel where the CPU has AVX-512 VNNI, else `_weight_int8pack_mm`
    assert layer.use_matvec_kernel() == on_kernel
    y = layer(x)
    rel = (y - exact).norm() / exact.norm()
    assert rel < 1e-2 and (rel > 0 or not on_kernel)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), y)
    many = torch.randn(40, 96)  # more rows than a decoding step: a bf16 GEMM on the exact int8 codes
    exact = F.linear(many, layer.dequantized_weight(), layer.bias)
    assert (layer(many) - exact).norm() / exact.norm() < 1e-2
    rounded = F.linear(many.bfloat16().float(), layer.weight.float()) * layer.scale + layer.bias
    torch.testing.assert_close(layer(many), rounded, rtol=1e-2, atol=1e-2)
    assert not QuantizedLinear.from_linear(torch.nn.Linear(40, 8)).use_matvec_kernel()  # width not a multiple of 32


@needs_kernel
@pytest.mark.parametrize("rows, masked", [(1, False), (3, True), (8, True)])
def test_decode_attention_equals_pytorchs_sdpa(rows, masked):
    """A few query rows per head against a cache (strided, as a slot pool's view is), with a padding mask."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, rows, 64)
    pool_k, pool_v = torch.randn(3, 3, 300, 64), torch.randn(3, 3, 300, 64)
    k, v = pool_k[:2, :, :256], pool_v[:2, :, :256]  # not contiguous: rows and positions of a larger pool
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, 256)
        mask[1, ..., 100:] = torch.finfo(torch.float32).min
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)
    torch.testing.assert_close(decode_attention(q, k, v, mask, 0.1), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        decode_attention(torch.randn(1, 3, 9, 64), k[:1], v[:1], None, 0.1)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("k", [64, 575])
def test_matvec_fp32_equals_float64_product(rows, k):
    """Row blocks of 8, 4 and 1 activation rows, a width with a masked tail (575 = 35 x 16 + 15), and a bias."""
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, k), torch.randn(131, k), torch.randn(131)
    expected = x.double() @ w.double().T + b.double()
    got = matvec(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (rows, 131)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(matvec(x, w).double(), expected - b.double(), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 9])
@pytest.mark.parametrize("k", [64, 575])
def test_matvec_bf16_is_the_exact_product_rounded_once(rows, k):
    """bf16 in, bf16 out: every product exact, fp32 sums, one rounding. Against the float64 product of the same
    bf16 numbers it is off by at most the final rounding (half a bf16 step: 8 significant bits, 2^-8 relative)
    plus the fp32 sums' own rounding."""
    torch.manual_seed(k)
    x, w, b = (torch.randn(*shape).bfloat16() for shape in ((rows, k), (131, k), (131,)))
    exact = x.double() @ w.double().T + b.double()
    got = matvec(x, w, b)
    assert got.dtype == torch.bfloat16
    error = (got.double() - exact).abs()
    assert (error <= exact.abs() * 2**-8 + 1e-4 * k**0.5).all()
    assert (got.double() == exact.bfloat16().double()).float().mean() > 0.95  # nearly always the nearest bf16


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 21, 40])
@pytest.mark.parametrize("k", [64, 575])
def test_pairs_linear_is_the_exact_product_rounded_once(rows, k):
    """The pair-interleaved kernel, as matvec: every bf16 product exact, fp32 sums, one rounding. Row blocks of
    16, 8, 4, 2 and 1, an odd width (575: the last input gets a zero partner) and 131 outputs (a last block of
    3 of 16)."""
    torch.manual_seed(rows + k)
    x, w, b = (torch.randn(*shape).bfloat16() for shape in ((rows, k), (131, k), (131,)))
    packed = pairs_pack(w)
    assert packed.shape == (9, (k + 1) // 2, 16, 2) and packed.dtype == torch.bfloat16
    assert torch.equal(packed[1, 5, 3], w[16 + 3, 10:12])  # P[b, p, j, e] = W[16 b + j, 2 p + e]
    for bias in (b, None):
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        got = pairs_linear(x, packed, bias, 131)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 131)
        assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4 * k**0.5).all()
        assert (got.double() == exact.bfloat16().double()).float().mean() > 0.95


@needs_kernel
def test_pairs_linear_refuses_a_copy_of_another_weight():
    packed = pairs_pack(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="pairs_pack's copy of an"):
        pairs_linear(torch.randn(2, 66).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="pairs_pack's copy of an"):
        pairs_linear(torch.randn(2, 64).bfloat16(), packed, None, 60)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        pairs_linear(torch.randn(2, 64), packed, None, 40)


@needs_kernel
def test_matvec_refuses_mixed_dtypes_and_shapes():
    with pytest.raises(RuntimeError, match="in x's dtype"):
        matvec(torch.randn(1, 64), torch.randn(8, 64).bfloat16())
    with pytest.raises(RuntimeError, match=r"contiguous \(N, K\)"):
        matvec(torch.randn(1, 64), torch.randn(8, 32))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_linear_keeps_the_layer_and_matches_f_linear(dtype):
    """MatvecLinear holds the Linear's own Parameters (state_dict and `.weight` identity kept), runs the kernel
    for a few rows and F.linear beyond them, and keeps gradients working (F.linear when they are needed)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(dtype)
    layer = MatvecLinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.state_dict().keys() == linear.state_dict().keys()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for rows in (1, MATVEC_MAX_ROWS[dtype], MATVEC_MAX_ROWS[dtype] + 1, 40):
        x = torch.randn(2, rows, 96).to(dtype)[:1]  # (1, rows, 96)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).float(), F.linear(x, linear.weight, linear.bias).float(), **tolerance)
    x = torch.randn(1, 96, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None


@needs_kernel
@pytest.mark.parametrize("rows, masked", [(1, False), (3, True)])
def test_decode_attention_in_bf16_computes_in_fp32(rows, masked):
    """bf16 q, k, v and mask, read as fp32, one rounding of the output: within a bf16 step of fp32 SDPA on the
    same bf16 numbers."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(*shape).bfloat16() for shape in ((2, 3, rows, 64), (2, 3, 200, 64), (2, 3, 200, 64)))
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, 200, dtype=torch.bfloat16)
        mask[1, ..., 50:] = torch.finfo(torch.bfloat16).min
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=None if mask is None else mask.float(), scale=0.125
    )
    got = decode_attention(q, k, v, mask, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=8e-3)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        decode_attention(q.float(), k, v, None, 0.125)


@pytest.mark.skipif(not kernel_fast("pairs"), reason="this CPU lacks AVX512-BF16: MatvecLinear keeps no packed copy")
def test_packed_matvec_linear_runs_many_rows_on_its_pair_copy_inside_a_graph_too():
    """`pack()` adds the pair-interleaved copy (bf16 only) for steps of 2 to PAIRS_MAX_ROWS rows; a traced graph
    calls the same kernel on it (no fallback); more rows take F.linear; the copy follows the weight when it
    changes in place or is loaded. All agree with F.linear to bf16 rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).bfloat16().requires_grad_(False)
    layer = MatvecLinear(linear)
    assert not MatvecLinear(torch.nn.Linear(8, 8)).pack()  # fp32: nothing to pack
    assert layer.pack() and layer.packed is not None and layer.state_dict().keys() == {"weight", "bias"}
    for rows in (1, 3, PAIRS_MAX_ROWS, PAIRS_MAX_ROWS + 1):
        x = torch.randn(rows, 96).bfloat16()
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        torch.testing.assert_close(layer(x).float(), expected, rtol=1.6e-2, atol=1e-2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    many = torch.randn(3, 5, 96).bfloat16()
    traced = torch.compile(layer, backend=backend, fullgraph=True)
    torch.testing.assert_close(traced(many), layer(many))
    assert "lmforge.pairs_linear" in graphs[0]
    with torch.no_grad():  # new weights in place, then loaded: the packed copy follows each time
        linear.weight.mul_(-2)
        torch.testing.assert_close(layer(many), F.linear(many, linear.weight, linear.bias), rtol=1.6e-2, atol=2e-2)
        layer.load_state_dict({"weight": torch.randn(40, 96).bfloat16(), "bias": linear.bias.clone()})
        torch.testing.assert_close(layer(many), F.linear(many, linear.weight, linear.bias), rtol=1.6e-2, atol=2e-2)


@needs_kernel
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo to read this CPU's flags from")
def test_the_fast_paths_follow_this_cpus_instruction_sets():
    """The library is built for the machine (-march=native): each kernel's vector path is there exactly when
    the CPU has its instructions (AVX-512, or AVX2 with FMA and F16C; the pair copy AVX512-BF16 alone), and
    `kernel_fast` says so; elsewhere callers keep PyTorch's kernels."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    avx2 = {"avx2", "fma", "f16c"} <= flags
    assert kernel_fast("fp32") == kernel_fast("attention") == ("avx512f" in flags or avx2)
    assert kernel_fast("bf16") == ({"avx512_bf16", "avx512bw"} <= flags or avx2)
    assert kernel_fast("int8") == kernel_fast("int4") == ({"avx512_vnni", "avx512vl", "f16c"} <= flags or avx2)
    assert kernel_fast("pairs") == ({"avx512_bf16", "avx512bw"} <= flags)


@needs_kernel
def test_without_native_bf16_products_decoding_layers_keep_the_kernel_longer_and_prefill_in_fp32(monkeypatch):
    """On a CPU without native bf16 products (AVX2: PyTorch's bf16 GEMM is emulated and ~3x slower than fp32
    there), a bf16 MatvecLinear runs steps of up to 16 rows on the matvec kernel, and a prefill as the fp32
    product of the same bf16 numbers rounded to bf16 once (exactly); int8 layers prefill in fp32 on their exact
    codes, int4 ones on the kernel's bf16 dequantisation, without the activations' rounding to bf16. Forced here
    on any CPU by the layers' own switches."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).bfloat16().requires_grad_(False)
    layer = MatvecLinear(linear)
    layer.native_bf16 = False
    calls = []
    monkeypatch.setattr(quant, "matvec", lambda x, w, b: calls.append(len(x)) or matvec(x, w, b))
    with torch.inference_mode():
        for rows in (8, 16):
            x = torch.randn(rows, 96).bfloat16()
            expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
            torch.testing.assert_close(layer(x).float(), expected, rtol=1.6e-2, atol=1e-2)
        prefill = torch.randn(40, 96).bfloat16()
        expected = F.linear(prefill.float(), linear.weight.float(), linear.bias.float()).bfloat16()
        assert torch.equal(layer(prefill), expected)
    assert calls == [8, 16]

    x = torch.randn(2, 40, 64)
    int8 = QuantizedLinear.from_linear(torch.nn.Linear(64, 48))
    int4 = quantised_layer(48, 64, 32)
    if not (int8.use_matvec_kernel() and int4.use_matvec_kernel()):
        return  # no int8 fast path on this CPU: the layers never take the kernel, nor this prefill branch
    int8.prefill_dtype = int4.prefill_dtype = torch.float32
    with torch.inference_mode():
        exact = F.linear(x.double(), int8.dequantized_weight(torch.float64), int8.bias.double()).float()
        torch.testing.assert_close(int8(x), exact, rtol=1e-5, atol=1e-5)
        weight = int4_dequantize(*int4._matvec, int4.group_size).double()
        torch.testing.assert_close(int4(x), F.linear(x.double(), weight).float(), rtol=1e-5, atol=1e-5)
