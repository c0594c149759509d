"""Memory per rank of a training run before it starts: `lmforge plan` for clusters we cannot run here.

For each parameter tensor, what rank 0 holds (the largest piece: FSDP and torch.chunk give the first ranks
ceil(d / n) rows):

    tensor parallel (degree t, `lmforge.train.parallel.TP_PLANS`): a column-wise layer keeps d_out / t rows,
        a row-wise layer d_in / t columns (its bias whole); embeddings, norms and the head stay whole
    FSDP (over n data-parallel ranks; HSDP: n = dp_shard, the ranks of one shard group): dim 0 of that piece
        split in n, rank 0 keeping ceil(d_0 / n) rows
    DDP: everything whole

Then, with p the parameters rank 0 holds and 4-byte (fp32) master weights, gradients and AdamW moments:

    params = 4 p      grads = 4 p      optimizer = 2 x 4 p  (m and v)

which is what `lmforge.train.parallel.state_bytes` counts on a running model (exactly for DDP, FSDP and TP
alone; for FSDP over TP shards FSDP splits the TP layer's global rows, which this takes as the TP piece's rows,
within a few rows per tensor).

Activations kept for backward are traced, not guessed from a formula: the model's own forward and loss run on
fake tensors (`torch._subclasses.FakeTensorMode`: shapes and dtypes, no memory, no arithmetic), with a
`saved_tensors_hooks` hook that records every tensor autograd keeps, each storage once, parameters left out. So
a family's real block is what is counted: SwiGLU's three d_ff-wide tensors, RMSNorm's saved inputs, GQA's
expanded keys, the logits the loss keeps, which no closed form tracks per family. The trace runs one- and two-
layer instances and extends linearly to L layers (`lmforge.models.build.measure_by_layers`), and short sequences
extended to the planned length (`traced_activations`), so an 8B-parameter plan takes seconds. For a GPT block
without dropout it gives 16 s b h values per layer, i.e. Korthikanti et al. (2022) eq. 1's 34 s b h bytes in 16
bits less the two dropout masks (with fused attention, which never stores the s x s scores);
`benchmarks/bench_parallel.py` sets it beside the memory a real forward pass takes.

Under tensor parallelism of degree t each saved tensor is split or whole by where it was saved (Megatron-LM's
layout, `TP_PLANS`): the input of a column-wise layer (a norm's output) is whole on every rank; the input of a
row-wise layer and everything inside attention or the FFN (q, k, v, attention output, activation inputs) is
1/t; norms, residuals, embeddings and the loss are whole. With activation checkpointing a block keeps only its
input, plus one block's internals while that block is recomputed.

Step time at an assumed model FLOPs utilisation u on g accelerators of peak F FLOP/s: each optimizer step
computes 6 N + 12 L h s FLOPs per token (`lmforge.models.stats.flops_per_token`) for b s dp tokens, so
tokens/s per accelerator = u F / flops_per_token. The planner assumes u; it does not measure it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lmforge.models import flops_per_token
from lmforge.models.build import FAMILIES, measure_by_layers, meta_model, no_init
from lmforge.models.config import ModelConfig
from lmforge.nn import Block
from lmforge.train.activations import enable_activation_checkpointing
from lmforge.train.memory import saved_tensor_bytes
from lmforge.train.parallel import TP_PLANS, ParallelMode

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


def local_parameters(config: ModelConfig, mode: ParallelMode, world_size: int, tp: int, dp_shard: int = 0) -> int:
    """Parameters rank 0 holds under `mode` on `world_size` ranks with tensor-parallel degree `tp` (and, for
    hsdp, shard groups of `dp_shard` ranks)."""
    fsdp, tp = mode.degrees(world_size, tp, dp_shard)
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
    dp_shard: int = 0,
) -> RankMemory:
    """Memory of rank 0 (see the module docstring); `batch` sequences of `seq_len` tokens per micro-batch."""
    p = local_parameters(config, mode, world_size, tp, dp_shard)
    t = mode.degrees(world_size, tp, dp_shard)[1]
    activations, checkpointed = traced_activations(config, batch, seq_len, dtype, t)
    return RankMemory(
        params=WEIGHT_BYTES * p,
        grads=WEIGHT_BYTES * p,
        optimizer=2 * WEIGHT_BYTES * p,
        activations=activations,
        activations_checkpointed=checkpointed,
    )


TRACE_LENGTHS = (16, 32, 64)  # tokens per traced sequence: three points fix a + b T + c T^2 exactly


def traced_activations(config: ModelConfig, batch: int, seq_len: int, dtype: str, tp: int = 1) -> tuple[int, int]:
    """Bytes one rank keeps for backward over one micro-batch of `batch` x `seq_len` tokens: (without, with
    activation checkpointing), traced on fake tensors (see the module docstring).

    A sequence's saved bytes are a + b T + c T^2 in its length T (c = 0 with fused attention; an attention
    path that stores its s x s weights makes it quadratic), so short sequences are traced and the polynomial
    evaluated at `seq_len`: tracing 8,192 tokens of a 128k vocabulary would walk the chunked loss row by row."""

    def trace(meta: nn.Module) -> tuple[int, ...]:
        def saved(rows: int, length: int) -> tuple[int, int, int]:  # without, with checkpointing, one block
            whole = _trace(meta.config, rows, length, dtype, tp, checkpointing=False)
            kept = _trace(meta.config, rows, length, dtype, tp, checkpointing=True)
            return sum(whole.values()), sum(kept.values()), max(whole.get(b, 0) for b in whole if b != "outside")

        # per sequence (two rows less one) and per batch (position ids, RoPE tables, the loss's count)
        one, two = ([saved(rows, n) for n in TRACE_LENGTHS] for rows in (1, 2))
        totals = []
        for i in range(3):
            per_row = [b[i] - a[i] for a, b in zip(one, two, strict=True)]
            fixed = [a[i] - r for a, r in zip(one, per_row, strict=True)]
            at = functools.partial(_quadratic, TRACE_LENGTHS, x=seq_len)
            totals.append(at(fixed) + batch * at(per_row))
        return totals[0], totals[1] + totals[2]

    return measure_by_layers(config, trace)


def _quadratic(xs: tuple[int, ...], ys: list[int], x: int) -> int:
    """The parabola through (xs, ys) at x (Lagrange's form, exact in fractions)."""
    from fractions import Fraction

    total = Fraction(0)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        term = Fraction(yi)
        for j, xj in enumerate(xs):
            if j != i:
                term *= Fraction(x - xj, xi - xj)
        total += term
    return round(total)


def _trace(config: ModelConfig, batch: int, seq_len: int, dtype: str, tp: int, checkpointing: bool) -> dict[str, int]:
    """Bytes one forward pass with loss saves, on fake tensors: per block (by name, each storage counted in the
    block that first saves it, its tensor-parallel part divided by `tp`) and "outside" the blocks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    default = torch.get_default_dtype()
    with FakeTensorMode(), no_init():
        try:  # FSDP's bf16 parameters (or autocast's bf16 copies) compute a bf16 step
            torch.set_default_dtype(getattr(torch, dtype))
            model = FAMILIES[config.family][1](config)
        finally:
            torch.set_default_dtype(default)
        model.train()
        split = _split_modules(model) if tp > 1 else {}
        if checkpointing:
            enable_activation_checkpointing(model)
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        saved = saved_tensor_bytes(
            model,
            {"input_ids": ids, "labels": ids},
            lambda name, block: "outside" if block is None else ("split " if split.get(name) else "") + block,
        )
    totals: dict[str, int] = {}
    for label, nbytes in saved.items():
        key = label.removeprefix("split ")
        totals[key] = totals.get(key, 0) + (nbytes // tp if label.startswith("split ") else nbytes)
    return totals


def _split_modules(model: nn.Module) -> dict[str, bool]:
    """Module name -> whether what it saves is 1/tp per rank under tensor parallelism: a column-wise layer
    saves its whole input (False), a row-wise layer its split input (True), attention and FFN internals are
    split (True); a module absent here saves whole tensors."""
    plan = TP_PLANS[model.config.family]
    split: dict[str, bool] = {}
    for block_name, block in model.named_modules():
        if not isinstance(block, Block):
            continue
        for part in ("attn", "ffn"):
            for name, _ in getattr(block, part).named_modules():
                split[f"{block_name}.{part}{'.' + name if name else ''}"] = True
        for path, style in plan.plan(block).items():
            split[f"{block_name}.{path}"] = not isinstance(style, ColwiseParallel)
    return split


def plan_throughput(config: ModelConfig, seq_len: int, peak_flops: float, mfu: float) -> dict[str, float]:
    """FLOPs per token and tokens/s per accelerator at utilisation `mfu` of `peak_flops`."""
    per_token = flops_per_token(meta_model(config), seq_len)
    return {"flops_per_token": per_token, "tokens_per_s_per_device": mfu * peak_flops / per_token}
