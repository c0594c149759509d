"""How much memory a training step's activations take, checked before the first step.

One bad value (`data.block_size=100000`) used to drive the machine into swap for minutes before anything
failed. The activations a block keeps for its backward pass follow Korthikanti et al. (2022), "Reducing
Activation Recomputation in Large Transformer Models", eq. 1: about s b h (34 + 5 a s / h) bytes per layer in
16-bit precision, for sequence length s, batch b, width h and a heads. Fused attention (SDPA's flash and
memory-efficient kernels, which both recipes use) never stores the a s^2 score matrices, which removes the
second term; fp32 doubles the rest. With activation checkpointing only each block's input (s b h values)
is kept, plus one block's internals while it is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.models.build import available_memory
from lmforge.nn import Block

BYTES_PER_TOKEN_AND_WIDTH_16BIT = 34  # Korthikanti et al. (2022), eq. 1 without the attention-score term


def activation_bytes(model: nn.Module, batch: int, seq_len: int, dtype: str, checkpointing: bool) -> int:
    """Estimated bytes of activations one micro-batch of `batch` x `seq_len` tokens keeps for backward."""
    blocks = sum(1 for m in model.modules() if isinstance(m, Block))
    width = getattr(model.config, "d_model", None) or getattr(model.config, "n_embd", 0)
    scale = 2 if dtype == "float32" else 1  # the paper's figures are for 16-bit activations
    per_block = seq_len * batch * width * BYTES_PER_TOKEN_AND_WIDTH_16BIT * scale
    if checkpointing:
        return blocks * seq_len * batch * width * 2 * scale + per_block
    return blocks * per_block


def check_activation_memory(
    model: nn.Module, batch: int, seq_len: int, dtype: str, checkpointing: bool, device: torch.device, what: str
) -> None:
    """Refuse, before the first step, a micro-batch whose activations cannot fit in the memory available;
    `what` names the settings to change (e.g. "data.block_size=100000 x train.batch_size=16")."""
    need = activation_bytes(model, batch, seq_len, dtype, checkpointing)
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
