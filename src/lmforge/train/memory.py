"""How much memory a training step's activations take, checked before the first step.

One bad value (`data.block_size=100000`) used to drive the machine into swap for minutes before anything
failed. The activations a block keeps for its backward pass follow Korthikanti et al. (2022), "Reducing
Activation Recomputation in Large Transformer Models", eq. 1: about s b h (34 + 5 a s / h) bytes per layer in
16-bit precision, for sequence length s, batch b, width h and a heads. Fused attention (SDPA's flash and
memory-efficient kernels, which both recipes use) never stores the a s^2 score matrices, which removes the
second term (short sequences on a CPU keep them: see `activation_bytes`); fp32 doubles the rest. With
activation checkpointing only each block's input (s b h values) is kept, plus one block's internals while it is
recomputed.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lmforge.models.build import available_memory
from lmforge.nn import Block
from lmforge.nn.attention import SHORT_TRAINING_ATTENTION
from lmforge.nn.precision import bf16_product_dtype

BYTES_PER_TOKEN_AND_WIDTH_16BIT = 34  # Korthikanti et al. (2022), eq. 1 without the attention-score term
WIDENED_ATTENTION_BYTES = 10
"""bf16 on a CPU without bf16 products (`lmforge.nn.precision`) runs the fused attention kernel on fp32 copies
of q, k, v, which it keeps with its fp32 output: at least 2 bytes more for each of those four s b h tensors;
measured with `saved_tensor_bytes` (a 2 x 128 GPT, 4 heads, 4 x 256 tokens): 10 bytes more per token and
width a block than PyTorch's bf16 autocast keeps."""


def activation_bytes(
    model: nn.Module, batch: int, seq_len: int, dtype: str, checkpointing: bool, device: torch.device | None = None
) -> int:
    """Estimated bytes of activations one micro-batch of `batch` x `seq_len` tokens keeps for backward. On a CPU,
    sequences of up to SHORT_TRAINING_ATTENTION tokens keep their fp32 attention weights (B H s^2 values a block,
    `lmforge.nn.attention.ShortTrainingAttention`); longer ones in bf16 on a CPU without bf16 products keep
    `WIDENED_ATTENTION_BYTES` more per token and width a block."""
    blocks = sum(1 for m in model.modules() if isinstance(m, Block))
    width = getattr(model.config, "d_model", None) or getattr(model.config, "n_embd", 0)
    scale = 2 if dtype == "float32" else 1  # the paper's figures are for 16-bit activations
    per_block = seq_len * batch * width * BYTES_PER_TOKEN_AND_WIDTH_16BIT * scale
    if device is not None and device.type == "cpu" and seq_len <= SHORT_TRAINING_ATTENTION:  # fp32 weights
        per_block += 4 * getattr(model.config, "n_head", 0) * seq_len**2 * batch
    elif device is not None and dtype == "bfloat16" and bf16_product_dtype(device) == torch.float32:
        per_block += WIDENED_ATTENTION_BYTES * seq_len * batch * width  # the fused kernel's fp32 q, k, v, output
    if checkpointing:
        return blocks * seq_len * batch * width * 2 * scale + per_block
    return blocks * per_block


def check_activation_memory(
    model: nn.Module, batch: int, seq_len: int, dtype: str, checkpointing: bool, device: torch.device, what: str
) -> None:
    """Refuse, before the first step, a micro-batch whose activations cannot fit in the memory available;
    `what` names the settings to change (e.g. "data.block_size=100000 x train.batch_size=16")."""
    need = activation_bytes(model, batch, seq_len, dtype, checkpointing, device)
    free = available_memory(device)
    if free is not None and need > free:
        hint = "" if checkpointing else ", or set train.activation_checkpointing=true"
        raise ValueError(
            f"{what} needs about {need / 2**30:.1f} GiB of activations per micro-batch but {free / 2**30:.1f} GiB "
            f"is available on {device.type}; lower them (use train.grad_accum for a larger batch){hint}"
        )


def saved_tensor_bytes(
    model: nn.Module, inputs: dict[str, torch.Tensor], where: Callable[[str, str | None], str] | None = None
) -> dict[str, int]:
    """Bytes autograd keeps for backward over one forward pass `model(**inputs)`, measured rather than
    estimated: every tensor a `saved_tensors_hooks` hook sees, each storage once (where it is first saved),
    parameters left out, summed by where it was saved: "block" (while a Transformer Block runs) or "outside"
    (embeddings, head, loss), or whatever `where(innermost module's name, the running block's name or None)`
    says. Works on fake tensors as on real ones (`lmforge.train.plan` traces with it)."""
    where = where or (lambda _name, block: "outside" if block is None else "block")
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int, str]] = {}
    running: list[str] = [""]
    blocks: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved.setdefault(storage._cdata, (storage.nbytes(), where(running[-1], blocks[-1] if blocks else None)))
        return t

    def enter(name: str, is_block: bool) -> None:
        running.append(name)
        if is_block:
            blocks.append(name)

    def leave(is_block: bool) -> None:
        running.pop()
        if is_block:
            blocks.pop()

    handles = []
    for name, module in model.named_modules():
        is_block = isinstance(module, Block)
        handles.append(module.register_forward_pre_hook(lambda *_, n=name, b=is_block: enter(n, b)))
        handles.append(module.register_forward_hook(lambda *_, b=is_block: leave(b)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    totals: dict[str, int] = {}
    for nbytes, label in saved.values():
        totals[label] = totals.get(label, 0) + nbytes
    return totals


# ---- the process heap during training (CPU)
#
# glibc's malloc serves a request above its mmap threshold (128 KiB at first, raised by frees up to 32 MiB) with
# a fresh mmap and unmaps it on free; freed memory at the top of the heap above the trim threshold goes back to
# the OS too. A training step allocates the same large activations and gradients again at every step, so each
# step pays a page fault (and the kernel's zeroing) per 4 KiB of every such tensor: at 6 layers x 384 wide,
# block 256, batch 64 that is ~14% of the fp32 step on 2 cores (measured: 10.3 s -> 8.9 s a step). PyTorch's
# CPU tuning guide recommends jemalloc or TCMalloc for this reason (https://pytorch.org/tutorials/recipes/
# recipes/tuning_guide.html, "Switch Memory allocator"); glibc itself keeps freed memory for reuse once mmap is
# off (M_MMAP_MAX = 0) and trimming is out of reach (M_TRIM_THRESHOLD huge), which mallopt(3) sets at run time.
# The resident size then stays at the step's peak instead of falling between steps.

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt(3) parameter numbers (malloc.h)
GLIBC_DEFAULT_TRIM_THRESHOLD, GLIBC_DEFAULT_MMAP_MAX = 128 * 1024, 65536
_heap_lock = threading.Lock()
_heap_users = 0


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc (mallopt and malloc_trim are glibc's), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (absent from musl and other C libraries)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def retained_heap(device: torch.device, enabled: bool = True) -> Iterator[bool]:
    """Inside, freed CPU memory stays in the process heap for the next step's tensors instead of going back to
    the OS (see above); yields whether that is in force (a CPU device, glibc, `enabled`). On leaving, glibc's
    documented defaults are restored and the retained memory is returned (malloc_trim). Nested and concurrent
    uses (a tuner's trials) share one setting, restored when the last one leaves."""
    global _heap_users
    libc = _glibc() if enabled and device.type == "cpu" else None
    if libc is None:
        yield False
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest value mallopt takes
    try:
        yield True
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
