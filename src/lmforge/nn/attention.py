"""Scaled dot-product attention, multi-head attention and the KV cache.

For queries Q (T_q x d_k), keys K (T_k x d_k) and values V (T_k x d_v):

    Attention(Q, K, V) = softmax(Q K^T * s + M) V,    s = 1 / sqrt(d_k) by default

M is an additive mask: 0 where a query may look, a very negative number where it may not (a causal
mask hides later keys, a padding mask hides pad keys), plus any position bias (T5). The 1/sqrt(d_k)
keeps the logits' variance near 1 when q and k have unit-variance entries, so the softmax does not
saturate. T5 folds that factor into its weight initialisation and uses s = 1.

Multi-head attention projects x into H query heads and H_kv key/value heads of width d_head, attends
per head, concatenates and projects back. H_kv = H is classic multi-head attention; H_kv = 1 is
multi-query attention (Shazeer, 2019); 1 < H_kv < H is grouped-query attention (Ainslie et al., 2023),
where query head h reads key/value head h // (H / H_kv). Fewer K/V heads shrink the KV cache.

Two implementations compute the same thing: `sdpa_attention` calls PyTorch's fused kernel
(`F.scaled_dot_product_attention`: flash / memory-efficient kernels on CUDA, a fused kernel on CPU);
`reference_attention` writes the formula out and is what tests hold the fused path against. The fused kernel never
forms the weights softmax(Q K^T * s + M); inside `recorded_attention(model)` every self-attention layer computes
them explicitly and keeps them (`lmforge explain` draws them), SDPA staying the default everywhere else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn.embedding import apply_rotary
from lmforge.nn.kernels import decode_attention
from lmforge.nn.norm import RMSNorm


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(Q K^T * scale + M) V, step by step. q (B, H, T_q, d), k and v (B, H, T_k, d).

    `mask` is either boolean (True = may attend) or additive float, broadcastable to (B, H, T_q, T_k).
    `is_causal` hides key j from query i when j > i (top-left aligned, as in PyTorch's SDPA).
    """
    weights = attention_probabilities(q, k, mask, is_causal, scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention weights softmax(Q K^T * scale + M), (B, H, T_q, T_k): row i is how query i spreads its
    attention over the keys (each row sums to 1). Arguments as in `reference_attention`."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # (B, H, T_q, T_k)
    if is_causal:
        t_q, t_k = scores.shape[-2:]
        later = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(later, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    return torch.softmax(scores, dim=-1).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The same function through PyTorch's fused kernel, except in training on a CPU over short sequences
    (`ShortTrainingAttention`), where the fused kernel's backward is the slow part of attention. Measured
    (PyTorch 2.13, 2 cores): a 4-layer, 128-wide GPT's training step over 12 x 64 tokens is ~5% faster with the
    explicit form (median of 6 interleaved rounds; per layer, forward + backward, 1.9 ms against the fp32
    kernel's 2.0-2.3 ms and the bf16 kernel's 2.9 ms); at 256 tokens the gain fell to ~2%, within noise, for
    ~18% more activation memory, so longer sequences keep the kernel. bf16 runs it in fp32 and casts back:
    faster, and rounded once instead of at every stage."""
    if _short_training_attention(q, k, mask, dropout_p):
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            y = ShortTrainingAttention.apply(q.float(), k.float(), v.float(), mask, is_causal, scale)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


SHORT_TRAINING_ATTENTION = 128  # longest sequence CPU training attends to explicitly (see sdpa_attention)


def _short_training_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> bool:
    """Training (gradients wanted) on a CPU over at most SHORT_TRAINING_ATTENTION tokens, without dropout and
    without a learned mask (T5's position bias takes the fused kernel, which differentiates it); never while
    `torch.export` traces (an ONNX export keeps one Attention node per layer)."""
    return (
        q.device.type == "cpu"
        and q.requires_grad
        and not torch.compiler.is_exporting()
        and dropout_p == 0.0
        and (mask is None or not mask.requires_grad)
        and max(q.shape[-2], k.shape[-2]) <= SHORT_TRAINING_ATTENTION
    )


class ShortTrainingAttention(torch.autograd.Function):
    """softmax(Q K^T s + M) V with the weights P formed explicitly and kept for the backward pass, whose gradients
    are four batched matmuls and one softmax backward:

        dV = P^T dY,   dP = dY V^T,   dS = P * (dP - rowsum(dP * P)) * s,   dQ = dS K,   dK = dS^T Q

    For up to SHORT_TRAINING_ATTENTION tokens P is small next to the activations a block keeps anyway
    (`lmforge.train.memory.activation_bytes` counts it), and these few large batched products beat the fused
    kernel's blocked loops. The mask is made additive and clamped to the finite range first, so a query that may
    see no key (left padding) averages the values instead of giving NaN."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):  # noqa: D102 (see the class)
        s = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(s)  # (B, H, T_q, T_k)
        if is_causal:  # key j is hidden from query i when j > i (top-left aligned, as PyTorch's is_causal)
            later = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
            scores.masked_fill_(later, float("-inf"))
        if mask is not None:
            low = torch.finfo(q.dtype).min
            scores = scores + (
                mask.logical_not().to(q.dtype) * low if mask.dtype == torch.bool else mask.to(q.dtype).clamp_min(low)
            )
        weights = torch.softmax(scores, dim=-1)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = s
        return torch.matmul(weights, v)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        q, k, v, weights = ctx.saved_tensors
        grad_weights = torch.matmul(grad, v.transpose(-2, -1))
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype).mul_(ctx.scale)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q)
        grad_v = torch.matmul(weights.transpose(-2, -1), grad)
        return grad_q, grad_k, grad_v, None, None, None


ATTENTION_IMPLEMENTATIONS = {"sdpa": sdpa_attention, "reference": reference_attention}


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    q_len: int,
    k_len: int,
    causal: bool,
    dtype: torch.dtype,
    position_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Combine padding, causality and position bias into one additive mask M for `Attention`.

    attention_mask: (B, T_k) with 1 for real tokens and 0 for padding (covers cached keys too).
    Queries are the last q_len of the k_len positions, so a causal query i sees keys j <= i + (k_len - q_len).
    Returns (mask, is_causal): when nothing but plain causality is needed, no mask is built and the fused
    kernel's own causal path is used. Blocked entries hold the dtype's most negative finite value. A query
    that may see no key at all (a left-pad position under a causal mask) is let see every key instead: its
    output is never read, and a row of only blocked entries would turn into NaN once the mask is cast to
    bf16 or fp16 under autocast (where that value overflows to -inf), and NaN spreads through later layers.
    """
    if attention_mask is None and position_bias is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == k_len:
            return None, True
    keep = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=_device_of(attention_mask, position_bias))
    if causal:
        keep = keep.tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.shape[-1] != k_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the keys span {k_len} "
                f"(cached + new tokens); pass a mask for all of them"
            )
        keep = keep & attention_mask.bool()[:, None, None, :]
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # a query that sees no key (a pad) sees all instead
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return bias, False


def _device_of(*tensors: torch.Tensor | None) -> torch.device | None:
    return next((t.device for t in tensors if t is not None), None)


class KVCache:
    """Keys and values of positions already processed, per attention layer.

    Self-attention entries grow by the new tokens at each step: tensors (B, H_kv, T_past, d_head).
    Cross-attention entries (encoder-decoder models) are computed once from the encoder output and
    reused. `reorder` selects batch rows, as beam search needs.
    """

    def __init__(self) -> None:
        self.self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        """Number of cached positions (0 when empty)."""
        return int(self.seq_len())

    def seq_len(self) -> int:
        """`len(cache)` as the models read it: the size itself, not `int()` of it, so that `torch.export` keeps
        it symbolic (a graph exported with a cache then takes any number of past positions, `lmforge.export`)."""
        if not self.self_kv:
            return 0
        return next(iter(self.self_kv.values()))[0].shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.self_kv:
            past_k, past_v = self.self_kv[layer]
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        self.self_kv[layer] = (k, v)
        return k, v

    def reorder(self, batch_index: torch.Tensor) -> None:
        for store in (self.self_kv, self.cross_kv):
            for layer, (k, v) in store.items():
                store[layer] = (k.index_select(0, batch_index), v.index_select(0, batch_index))


class StaticKVCache:
    """A KV cache of preallocated buffers (B, H_kv, max_len, d_head), written in place.

    Same interface as `KVCache`, but appending copies the new keys/values into the next free slots
    instead of concatenating: no per-step allocation, and no copy of the whole past at each step (a
    `torch.cat` cache moves O(T) memory per token, O(T^2) per sequence). Attention reads the filled
    prefix as a view. `max_len` bounds the cached positions (prompt + new tokens).
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # filled prefixes (views)
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.seq_len())

    def seq_len(self) -> int:
        if not self.self_kv:
            return 0
        return next(iter(self.self_kv.values()))[0].shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._buffers:
            B, H, _, d = k.shape
            self._buffers[layer] = tuple(k.new_empty(B, H, self.max_len, d) for _ in range(2))
        past = self.self_kv[layer][0].shape[-2] if layer in self.self_kv else 0
        end = past + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} were needed; pass a larger max_len")
        buffer_k, buffer_v = self._buffers[layer]
        buffer_k[:, :, past:end].copy_(k)
        buffer_v[:, :, past:end].copy_(v)
        self.self_kv[layer] = (buffer_k[:, :, :end], buffer_v[:, :, :end])
        return self.self_kv[layer]

    def reorder(self, batch_index: torch.Tensor) -> None:
        for layer, (buffer_k, buffer_v) in self._buffers.items():
            end = self.self_kv[layer][0].shape[-2]
            buffer_k[:, :, :end] = buffer_k[:, :, :end].index_select(0, batch_index)
            buffer_v[:, :, :end] = buffer_v[:, :, :end].index_select(0, batch_index)
        for layer, (k, v) in self.cross_kv.items():
            self.cross_kv[layer] = (k.index_select(0, batch_index), v.index_select(0, batch_index))


class Attention(nn.Module):
    """Multi-head self- or cross-attention with optional GQA/MQA, RoPE, QK-norm and a KV cache.

    Self-attention projects q, k and v with one fused matrix (one GEMM instead of three);
    cross-attention projects q from x and k, v from the encoder output `memory`.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        out_bias: bool | None = None,
        cross: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        dropout: float = 0.0,
        layer_idx: int = 0,
        implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_heads = n_kv_heads or n_head
        self.head_dim = head_dim or d_model // n_head
        self.cross, self.scale, self.dropout, self.layer_idx = cross, scale, dropout, layer_idx
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention={implementation!r} is unknown; choose one of {list(ATTENTION_IMPLEMENTATIONS)}"
            )
        self.attend = ATTENTION_IMPLEMENTATIONS[implementation]
        self.keep_weights = False  # set by `recorded_attention`: keep the weights of the last forward
        self.decode_kernel = False  # set by `prepare_for_decoding`: decoding steps on lmforge's attention kernel
        self.weights: torch.Tensor | None = None
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(d_model, q_dim, bias=bias)
            self.kv = nn.Linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(q_dim, d_model, bias=bias if out_bias is None else out_bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, d_head)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | StaticKVCache | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). `mask` is additive, broadcastable to (B, H, T, T_k)."""
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            if cache is not None and self.layer_idx in cache.cross_kv:
                k, v = cache.cross_kv[self.layer_idx]
            else:
                if memory is None:
                    raise ValueError("cross-attention needs the encoder output `memory`")
                k, v = (self._heads(t, self.n_kv_heads) for t in self.kv(memory).split(kv_dim, dim=-1))
                if self.k_norm is not None:
                    k = self.k_norm(k)
                if cache is not None:
                    cache.cross_kv[self.layer_idx] = (k, v)
            if self.q_norm is not None:
                q = self.q_norm(q)
        else:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            q, k, v = (
                self._heads(q, self.n_head),
                self._heads(k, self.n_kv_heads),
                self._heads(v, self.n_kv_heads),
            )
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.append(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        shared_mask = mask is None or (mask.dim() == 4 and mask.shape[1] == 1)  # the same for every head
        grouped = self.n_kv_heads != self.n_head or self.decode_kernel
        if grouped and T == 1 and shared_mask and not is_causal and not self.keep_weights:
            y = self._grouped_decode(q, k, v, mask, dropout)
            return self.out(y.reshape(B, 1, q_dim))
        if self.n_kv_heads != self.n_head:  # GQA/MQA: each K/V head serves n_head / n_kv_heads query heads
            repeat = self.n_head // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if self.keep_weights:  # the explicit path: the fused kernel never forms the weights
            self.weights = attention_probabilities(q, k, mask, is_causal, self.scale)  # (B, H, T, T_k)
            y = F.dropout(self.weights, p=dropout) @ v
        else:
            y = self.attend(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(B, T, q_dim))

    def _grouped_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
    ) -> torch.Tensor:
        """GQA/MQA attention of one new token per row without copying K and V per query head.

        Query head h reads K/V head h // g (g = n_head / n_kv_heads). With one query position the g query
        heads of a K/V head are g query rows against the same keys, so q (B, H, 1, d) is viewed as
        (B, H_kv, g, d) and attends to the cache's (B, H_kv, T_k, d) as it is. The usual path repeats K and V
        g times first (`repeat_interleave`), which at decoding is a copy of the whole cache in every layer
        at every step (SmolLM2-135M, g = 3, 256 slots: 35 MB a token, as much as its int4 weights). A mask
        shared by the heads ((B, 1, 1, T_k)) broadcasts over the g rows unchanged. With `decode_kernel` (set by
        `prepare_for_decoding`, also for g = 1) fp32 and bf16 steps on CPU run in
        `lmforge.nn.kernels.decode_attention`.
        Returns (B, H, 1, d)."""
        B = q.shape[0]
        rows = q.reshape(B, self.n_kv_heads, self.n_head // self.n_kv_heads, self.head_dim)
        if self.decode_kernel and self._kernel_fits(rows, k, v, mask, dropout):
            y = decode_attention(rows, k, v, mask, self.scale or self.head_dim**-0.5)
        else:
            y = self.attend(rows, k, v, mask=mask, is_causal=False, scale=self.scale, dropout_p=dropout)
        return y.reshape(B, self.n_head, 1, self.head_dim)

    @staticmethod
    def _kernel_fits(
        rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
    ) -> bool:
        """Whether `lmforge.nn.kernels.decode_attention` takes these: fp32 or bf16 on CPU, up to 8 rows per K/V
        head, a head size that is a multiple of 16, dense last dims, a per-sequence mask of the same dtype or none,
        no dropout."""
        return (
            rows.is_cpu
            and rows.dtype == k.dtype == v.dtype
            and rows.dtype in (torch.float32, torch.bfloat16)
            and rows.shape[2] <= 8
            and rows.shape[3] % 16 == 0
            and k.stride(-1) == 1
            and v.stride(-1) == 1
            and dropout == 0.0
            and (mask is None or (mask.dtype == rows.dtype and mask.shape[:3] == (rows.shape[0], 1, 1)))
            and (mask is None or mask.stride(-1) == 1)
        )


@contextlib.contextmanager
def recorded_attention(model: nn.Module) -> Iterator[list[Attention]]:
    """Within the block, every self-attention layer of `model` computes softmax(Q K^T * s + M) explicitly and
    keeps it: after a forward pass, `[layer.weights for layer in layers]` are the (B, H, T_q, T_k) weights of
    each layer, in the order the model runs them. Outside it SDPA runs as usual (the fused kernel does not
    return the weights, and materialising them costs O(T^2) memory per head). Cross-attention is left out."""
    layers = [m for m in model.modules() if isinstance(m, Attention) and not m.cross]
    for layer in layers:
        layer.keep_weights = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.keep_weights, layer.weights = False, None
