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
