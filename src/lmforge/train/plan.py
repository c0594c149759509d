"""Memory per rank of a training run before it starts: `lmforge plan` for clusters we cannot run here.

For each parameter tensor, what rank 0 holds (the largest piece: FSDP and torch.chunk give the first ranks
ceil(d / n) rows):

    tensor parallel (degree t, `lmforge.train.parallel.TP_PLANS`): a column-wise layer keeps d_out / t rows,
        a row-wise layer d_in / t columns (its bias whole); embeddings, norms and the head stay whole
    FSDP (over n data-parallel ranks): dim 0 of that piece split in n, rank 0 keeping ceil(d_0 / n) rows
    DDP: everything whole

Then, with p the parameters rank 0 holds and 4-byte (fp32) master weights, gradients and AdamW moments:

    params = 4 p      grads = 4 p      optimizer = 2 x 4 p  (m and v)

which is what `lmforge.train.parallel.state_bytes` counts on a running model (exactly for DDP, FSDP and TP
alone; for FSDP over TP shards FSDP splits the TP layer's global rows, which this takes as the TP piece's rows,
within a few rows per tensor).

Activations kept for backward per micro-batch of b sequences of s tokens, width h, L blocks (Korthikanti et al.,
2022, eq. 2 with fused attention, which never stores the s x s scores; 16-bit, twice that in fp32):

    without checkpointing   L s b h (10 + 24 / t)        (t = 1: the 34 s b h of `lmforge.train.memory`)
    with checkpointing      L s b h 2  +  s b h (10 + 24 / t)   (block inputs, plus one block recomputed)

Step time at an assumed model FLOPs utilisation u on g accelerators of peak F FLOP/s: each optimizer step
computes 6 N + 12 L h s FLOPs per token (`lmforge.models.stats.flops_per_token`) for b s dp tokens, so
tokens/s per accelerator = u F / flops_per_token. The planner assumes u; it does not measure it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lmforge.models import flops_per_token
from lmforge.models.build import meta_model
from lmforge.models.config import ModelConfig
from lmforge.nn import Block
from lmforge.train.memory import BYTES_PER_TOKEN_AND_WIDTH_16BIT
from lmforge.train.parallel import TP_PLANS, ParallelMode

REPLICATED_PART = 10  # of the 34: layer-norm inputs and dropout masks, which tensor parallelism does not split
WEIGHT_BYTES = 4  # fp32 master weights, gradients and moments (bf16 autocast computes in 16 bits, stores 32)


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds (rank 0, the largest)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    activations_checkpointed: int

    def total(self, checkpointing: bool) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + (self.activations_checkpointed if checkpointing else self.activations)
        )


def tp_split_dims(model: nn.Module, tp: int) -> dict[str, int]:
    """Parameter name -> the dim tensor parallelism splits (0: column-wise, 1: row-wise weight); others absent."""
    if tp == 1:
        return {}
    dims: dict[str, int] = {}
    plan = TP_PLANS[model.config.family]
    for block_name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for path, style in plan.plan(block).items():
            layer = f"{block_name}.{path}"
            if isinstance(style, ColwiseParallel):  # FusedColwiseParallel too: rows by section, as many
                dims |= {f"{layer}.weight": 0, f"{layer}.bias": 0}
            elif isinstance(style, RowwiseParallel):
                dims[f"{layer}.weight"] = 1
    return dims


def local_parameters(config: ModelConfig, mode: ParallelMode, world_size: int, tp: int) -> int:
    """Parameters rank 0 holds under `mode` on `world_size` ranks with tensor-parallel degree `tp`."""
    fsdp, tp = mode.degrees(world_size, tp)
    model = meta_model(config)
    dims = tp_split_dims(model, tp)
    total = 0
    for name, p in model.named_parameters():  # a tied weight once, as the model holds it
        shape = list(p.shape)
        if name in dims:
            shape[dims[name]] //= tp
        if shape:
            shape[0] = math.ceil(shape[0] / fsdp)
        total += math.prod(shape)
    return total


def plan_memory(
    config: ModelConfig,
    mode: ParallelMode,
    world_size: int,
    tp: int,
    batch: int,
    seq_len: int,
    dtype: str = "bfloat16",
) -> RankMemory:
    """Memory of rank 0 (see the module docstring); `batch` sequences of `seq_len` tokens per micro-batch."""
    p = local_parameters(config, mode, world_size, tp)
    t = mode.degrees(world_size, tp)[1]
    model = meta_model(config)
    blocks = sum(1 for m in model.modules() if isinstance(m, Block))
    tokens = batch * seq_len * config.d_model * (2 if dtype == "float32" else 1)
    per_block = tokens * (REPLICATED_PART + (BYTES_PER_TOKEN_AND_WIDTH_16BIT - REPLICATED_PART) / t)
    return RankMemory(
        params=WEIGHT_BYTES * p,
        grads=WEIGHT_BYTES * p,
        optimizer=2 * WEIGHT_BYTES * p,
        activations=int(blocks * per_block),
        activations_checkpointed=int(blocks * tokens * 2 + per_block),
    )


def plan_throughput(config: ModelConfig, seq_len: int, peak_flops: float, mfu: float) -> dict[str, float]:
    """FLOPs per token and tokens/s per accelerator at utilisation `mfu` of `peak_flops`."""
    per_token = flops_per_token(meta_model(config), seq_len)
    return {"flops_per_token": per_token, "tokens_per_s_per_device": mfu * peak_flops / per_token}
