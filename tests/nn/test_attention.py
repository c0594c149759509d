"""The fused SDPA path must equal the written-out formula for every kind of mask; GQA, RoPE and the cache."""

import math

import pytest
import torch

from lmforge.nn import Attention, KVCache, build_attention_bias, reference_attention, sdpa_attention
from lmforge.nn.attention import SHORT_TRAINING_ATTENTION, ShortTrainingAttention
from lmforge.nn.kernels import kernels_available


def qkv(B=2, H=4, Tq=6, Tk=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Tq, D, generator=g),
        torch.randn(B, H, Tk, D, generator=g),
        torch.randn(B, H, Tk, D, generator=g),
    )


PADDING = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "padding, causal, with_bias",
    [
        (None, False, False),
        (None, True, False),
        (PADDING, False, False),
        (PADDING, True, False),
        (None, False, True),
        (PADDING, True, True),
    ],
)
def test_sdpa_equals_reference_for_every_mask_kind(padding, causal, with_bias):
    q, k, v = qkv()
    bias = torch.randn(1, 4, 6, 6) if with_bias else None
    mask, is_causal = build_attention_bias(padding, 6, 6, causal, torch.float32, bias)
    fused = sdpa_attention(q, k, v, mask=mask, is_causal=is_causal)
    ref = reference_attention(q, k, v, mask=mask, is_causal=is_causal)
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=0)


def test_reference_attention_is_the_textbook_formula():
    q, k, v = qkv(B=1, H=1)
    scores = q[0, 0] @ k[0, 0].T / math.sqrt(8)
    expected = torch.softmax(scores, dim=-1) @ v[0, 0]
    torch.testing.assert_close(reference_attention(q, k, v)[0, 0], expected, atol=1e-6, rtol=0)


def test_boolean_and_additive_masks_agree():
    q, k, v = qkv()
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(
        reference_attention(q, k, v, mask=keep), sdpa_attention(q, k, v, mask=additive), atol=1e-6, rtol=0
    )


def test_causal_mask_with_cache_offset_lets_new_queries_see_all_past_keys():
    mask, is_causal = build_attention_bias(None, 2, 5, True, torch.float32)
    visible = mask[0, 0] == 0
    assert not is_causal
    assert visible.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pad_query_rows_stay_finite_when_the_mask_is_cast_to_half_precision(dtype):
    """Autocast casts the fp32 mask to bf16/fp16, where its most negative value overflows to -inf; a query
    row that sees no key must still give finite numbers, or NaN would spread through the next layers."""
    q, k, v = (t.to(dtype) for t in qkv(Tq=3, Tk=3))
    padding = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: query 0 of row 0 sees nothing causally
    mask, _ = build_attention_bias(padding, 3, 3, True, torch.float32)
    assert torch.isfinite(sdpa_attention(q, k, v, mask=mask.to(dtype))).all()
    real = sdpa_attention(q.float(), k.float(), v.float(), mask=mask)[0, :, 1:]
    expected = reference_attention(q.float()[:1, :, 1:], k.float()[:1, :, 1:], v.float()[:1, :, 1:], is_causal=True)
    torch.testing.assert_close(real, expected[0], atol=1e-6, rtol=0)


def test_scale_argument_replaces_one_over_sqrt_dk():
    q, k, v = qkv()
    expected = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(sdpa_attention(q, k, v, scale=1.0), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_attention_reads_shared_kv_heads(n_kv_heads):
    """Query head h must use key/value head h // (n_head / n_kv_heads): check against per-head math."""
    torch.manual_seed(0)
    attn = Attention(16, n_head=4, n_kv_heads=n_kv_heads, bias=False).eval()
    x = torch.randn(2, 5, 16)
    y = attn(x, is_causal=True)
    q, k, v = attn.qkv(x).split([16, 4 * n_kv_heads, 4 * n_kv_heads], dim=-1)
    outs = []
    for h in range(4):
        g = h // (4 // n_kv_heads)
        qh, kh, vh = q[..., 4 * h : 4 * h + 4], k[..., 4 * g : 4 * g + 4], v[..., 4 * g : 4 * g + 4]
        scores = qh @ kh.transpose(-2, -1) / 2.0
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(scores, -1) @ vh)
    torch.testing.assert_close(y, attn.out(torch.cat(outs, -1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "reference", "kernel"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_grouped_query_decoding_step_reads_shared_kv_heads_through_the_cache(n_kv_heads, implementation):
    """One new token per row against a cache and a padding mask (the decoding step, where the query heads of a
    K/V head attend as rows of one group instead of K/V being copied per head; "kernel": lmforge's C++ decoding
    attention, which `prepare_for_decoding` turns on): per-head math as the oracle."""
    if implementation == "kernel" and not kernels_available():
        pytest.skip("no C++ compiler to build lmforge's kernels")
    torch.manual_seed(0)
    attn = Attention(
        64, n_head=4, n_kv_heads=n_kv_heads, bias=False, implementation=implementation.replace("kernel", "sdpa")
    ).eval()
    attn.decode_kernel = implementation == "kernel"
    x = torch.randn(2, 6, 64)
    cache = KVCache()
    attn(x[:, :5], mask=build_attention_bias(PADDING[:, :5], 5, 5, True, torch.float32)[0], cache=cache)
    mask = build_attention_bias(PADDING, 1, 6, True, torch.float32)[0]  # row 1: keys 4 and 5 are padding
    y = attn(x[:, 5:], mask=mask, cache=cache)
    q = attn.qkv(x[:, 5:])[..., :64]
    k, v = attn.qkv(x)[..., 64:].split(16 * n_kv_heads, dim=-1)
    outs = []
    for h in range(4):
        g = h // (4 // n_kv_heads)
        qh, kh, vh = q[..., 16 * h : 16 * h + 16], k[..., 16 * g : 16 * g + 16], v[..., 16 * g : 16 * g + 16]
        scores = (qh @ kh.transpose(-2, -1) / 4.0).masked_fill(~PADDING.bool()[:, None, :], float("-inf"))
        outs.append(torch.softmax(scores, -1) @ vh)
    torch.testing.assert_close(y, attn.out(torch.cat(outs, -1)), atol=1e-5, rtol=0)


def test_attention_module_sdpa_equals_reference_implementation():
    torch.manual_seed(0)
    fused = Attention(32, n_head=4, n_kv_heads=2, qk_norm=True).eval()
    ref = Attention(32, n_head=4, n_kv_heads=2, qk_norm=True, implementation="reference").eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 32)
    mask, _ = build_attention_bias(PADDING, 6, 6, True, torch.float32)
    torch.testing.assert_close(fused(x, mask=mask), ref(x, mask=mask), atol=1e-6, rtol=0)


def test_kv_cache_grows_and_reorders_batch_rows():
    cache = KVCache()
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    cache.append(0, k, k)
    cache.append(0, k[:, :, :1], k[:, :, :1])
    assert len(cache) == 4
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.self_kv[0][0][0], cache.self_kv[0][0][1])


def test_unknown_attention_implementation_is_rejected():
    with pytest.raises(ValueError, match="attention='flash3' is unknown"):
        Attention(8, 2, implementation="flash3")


def test_attention_mask_must_cover_cached_and_new_keys():
    with pytest.raises(ValueError, match="attention_mask covers 3 positions but the keys span 5"):
        build_attention_bias(torch.ones(1, 3), 1, 5, True, torch.float32)


@pytest.mark.parametrize("T, attends_in_fp32", [(64, True), (160, False)])
def test_short_bf16_training_attention_on_cpu_runs_in_fp32(T, attends_in_fp32):
    """bf16 training on CPU: short sequences attend explicitly in fp32 (the bf16 kernel's backward is ~4x slower),
    long ones keep the bf16 kernel; both stay within bf16 rounding of the fp32 formula, gradients included."""
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(B=2, H=2, Tq=T, Tk=T, D=16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa_attention(q, k, v, is_causal=True)
    assert y.dtype == torch.bfloat16
    fp32 = ShortTrainingAttention.apply(q.float(), k.float(), v.float(), None, True, None)
    bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(y, fp32.bfloat16() if attends_in_fp32 else bf16)
    ref = reference_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    y.float().square().sum().backward()
    (q_ref,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(q.grad.float(), q_ref.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mask_kind", ["causal", "padding", "boolean", "causal+padding"])
def test_short_training_attention_has_the_exact_gradients(mask_kind):
    """The explicit forward and hand-written backward of CPU training attention, against autograd's numerical
    gradients in float64."""
    q, k, v = (t.double().requires_grad_() for t in qkv(B=2, H=2, Tq=5, Tk=5, D=4))
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    mask, is_causal = build_attention_bias(padding if "padding" in mask_kind else None, 5, 5, "causal" in mask_kind,
                                           torch.float64)  # fmt: skip
    if mask_kind == "boolean":
        mask = padding.bool()[:, None, None, :]
    torch.autograd.gradcheck(lambda q, k, v: ShortTrainingAttention.apply(q, k, v, mask, is_causal, None), (q, k, v))


@pytest.mark.parametrize("T", [8, SHORT_TRAINING_ATTENTION])
def test_cpu_training_attention_equals_pytorch_sdpa_with_gradients(T):
    """Training on a CPU over short sequences takes the explicit path: its output and gradients are PyTorch's
    fused kernel's (the oracle) to float rounding, with a causal mask and with padding."""
    padding = torch.ones(2, T, dtype=torch.long)
    padding[1, : T // 4] = 0  # left padding
    for attention_mask in (None, padding):
        mask, is_causal = build_attention_bias(attention_mask, T, T, True, torch.float32)
        q, k, v = (t.requires_grad_() for t in qkv(B=2, H=3, Tq=T, Tk=T, D=16))
        ours = sdpa_attention(q, k, v, mask=mask, is_causal=is_causal)
        assert ours.grad_fn.name() == "ShortTrainingAttentionBackward"
        oracle = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        real = slice(None) if attention_mask is None else (1, slice(None), slice(T // 4, None))  # pad rows differ
        torch.testing.assert_close(ours[real], oracle[real], atol=2e-6, rtol=1e-5)
        g = torch.randn_like(ours)
        if attention_mask is not None:
            g[1, :, : T // 4] = 0  # no gradient reaches pad queries (the loss ignores them)
        ours_grads = torch.autograd.grad(ours, (q, k, v), g)
        oracle_grads = torch.autograd.grad(oracle, (q, k, v), g)
        for mine, theirs in zip(ours_grads, oracle_grads, strict=True):
            torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-4)


def test_longer_sequences_a_learned_mask_dropout_or_no_gradients_keep_the_fused_kernel():
    def path(T=8, requires_grad=True, bias_grad=False, dropout_p=0.0):
        q, k, v = (t.requires_grad_(requires_grad) for t in qkv(B=1, H=2, Tq=T, Tk=T, D=4))
        bias = torch.zeros(1, 2, T, T, requires_grad=bias_grad)
        y = sdpa_attention(q, k, v, mask=bias, dropout_p=dropout_p)
        return y.grad_fn.name() if y.grad_fn is not None else None

    assert path() == "ShortTrainingAttentionBackward"
    assert path(T=SHORT_TRAINING_ATTENTION + 1) != "ShortTrainingAttentionBackward"
    assert path(bias_grad=True) != "ShortTrainingAttentionBackward"  # T5's position bias is differentiated
    assert path(dropout_p=0.1) != "ShortTrainingAttentionBackward"
    assert path(requires_grad=False) is None  # inference: the fused kernel, no graph


def test_pad_rows_stay_finite_in_cpu_training_attention():
    """A query that may see no key (its mask is the most negative float, or -inf after a cast to half) averages
    the values instead of giving NaN."""
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=1, Tq=3, Tk=3, D=4))
    for mask in (torch.full((1, 1, 3, 3), torch.finfo(torch.float32).min), torch.full((1, 1, 3, 3), -math.inf)):
        y = sdpa_attention(q, k, v, mask=mask)
        assert torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(q.grad).all()
