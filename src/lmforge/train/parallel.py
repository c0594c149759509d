"""How a run spreads its model over processes: one object per `train.parallel` mode, on PyTorch's own engine.

    ddp    every process holds the whole model, optimizer state and gradients; DDP all-reduces gradients
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`) per Transformer block, then the root: each of the N
           processes keeps 1/N of every parameter, gradient and optimizer moment (row-sharded DTensors);
           a block's full weights exist only while it runs (all-gather before its forward and backward,
           reduce-scatter of its gradients after)
    tp     tensor parallelism (`parallelize_module`, one `BlockPlan` per family): every process reads the same
           batch and computes 1/t of each block's heads and FFN units (Megatron-LM's column/row split)
    hsdp   hybrid sharding (FSDP2 on a 2-D mesh ("replicate", "shard")): FSDP within groups of
           train.dp_shard processes (a node, say), whole replicas across the groups; the gradients are
           reduce-scattered inside a group and all-reduced across groups, so the slow network between nodes
           carries 1/dp_shard of the gradients per rank and never the all-gathers of the weights
    fsdp+tp  a 2-D mesh ("dp", "tp"): tensor parallel inside groups of t processes, FSDP across the groups

Per rank, with P parameters of b bytes and Adam's two moments, DDP holds P b (weights) + P b (gradients)
+ 2 P b (moments) = 4 P b; FSDP over N ranks holds 4 P b / N (HSDP 4 P b / dp_shard) plus the unsharded
weights of the one block being computed; TP holds 4 b (P_blocks / t + P_rest). `state_bytes` counts what a
rank actually holds, `lmforge.train.plan` predicts it.

The data-parallel arithmetic stays the loop's (`lmforge.train.loop`): each process takes its rows of the global
batch, scales its summed loss by world / units, and the reduction averages over processes. FSDP2's
reduce-scatter averages just like DDP's all-reduce, so one process with batch N B and N processes with batch B
take the same steps. Under TP the processes of a group share their rows (`DistInfo.dp_rank`); counting each
row once per member scales both the loss sum and the unit count, so the loop's ratio is unchanged. Sharded runs
save sharded checkpoints (`lmforge.train.checkpoint`, DCP).

A mode checks the run before anything is built (`check`), builds the device mesh (`place`), shards the model
in place before the optimizer is created (`shard`: the optimizer must see the sharded parameters) and may
wrap it for the forward pass (`wrap`: DDP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from lmforge.nn import Block
from lmforge.train.distributed import DistInfo, wrap_model


@dataclass(frozen=True)
class ParallelMode:
    """Data parallelism with whole replicas (DDP): the default, and the base the sharded modes share."""

    name: str = "ddp"
    sharded: bool = False  # whether checkpoints are written shard by shard (DCP) by every rank
    offloads: bool = False  # whether train.cpu_offload means something here
    tensor_parallel: bool = False  # whether train.tp means something here
    hybrid: bool = False  # whether train.dp_shard means something here

    def check(self, model_config: Any, tc: Any, world_size: int) -> None:
        """Refuse a run this mode cannot do, in one line, before training starts."""
        if tc.cpu_offload and not self.offloads:
            raise ValueError(f"train.cpu_offload needs train.parallel=fsdp (it offloads FSDP shards), not {self.name}")
        if tc.tp != 1 and not self.tensor_parallel:
            raise ValueError(f"train.tp={tc.tp} needs train.parallel=tp or fsdp+tp, not {self.name}")
        if tc.dp_shard and not self.hybrid:
            raise ValueError(f"train.dp_shard={tc.dp_shard} needs train.parallel=hsdp, not {self.name}")

    def degrees(self, world_size: int, tp: int, dp_shard: int = 0) -> tuple[int, int]:
        """(ranks FSDP shards over, tensor-parallel degree) on `world_size` processes with train.tp=`tp` and
        train.dp_shard=`dp_shard`; a layout the world size does not fit is refused."""
        return 1, 1

    def place(self, info: DistInfo, tc: Any) -> DistInfo:
        """`info` with this mode's data-parallel rank and size and device mesh."""
        return info

    def shard(self, model: nn.Module, info: DistInfo, tc: Any) -> nn.Module:
        """Shard `model` in place (before the optimizer is built); returns it."""
        return model

    def wrap(self, model: nn.Module, info: DistInfo) -> nn.Module:
        """The module the forward pass calls (DDP around the model; the sharded model itself)."""
        return wrap_model(model, info)


@dataclass(frozen=True)
class FullyShard(ParallelMode):
    """FSDP2: parameters, gradients and optimizer state sharded over all processes, one unit per block."""

    name: str = "fsdp"
    sharded: bool = True
    offloads: bool = True

    def degrees(self, world_size: int, tp: int, dp_shard: int = 0) -> tuple[int, int]:
        return world_size, 1

    def place(self, info: DistInfo, tc: Any) -> DistInfo:
        if info.world_size == 1:
            return info
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
        return replace(info, mesh=mesh)

    def shard(self, model: nn.Module, info: DistInfo, tc: Any) -> nn.Module:
        """`fully_shard` each Block, then the root (embeddings, final norm, head). With train.dtype=bfloat16 the
        all-gathered weights are bf16 and gradients are reduced in fp32 (the shards, and the optimizer, stay
        fp32); train.cpu_offload keeps shards, gradients and optimizer state in host memory."""
        if info.mesh is None:
            return model  # one process: nothing to shard, the checkpoint format stays sharded
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        names = info.mesh.mesh_dim_names or ()
        options: dict[str, Any] = {"mesh": info.mesh["dp"] if "dp" in names else info.mesh}  # 2-D for hsdp
        if tc.dtype == "bfloat16":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        options["offload_policy"] = (
            CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if tc.cpu_offload else OffloadPolicy()
        )
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        for i, block in enumerate(blocks):
            # the last block's weights are gathered again at once by the root's backward: keep them
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **options)
        fully_shard(model, **options)
        return model

    def wrap(self, model: nn.Module, info: DistInfo) -> nn.Module:
        return model


@dataclass(frozen=True)
class HybridShard(FullyShard):
    """HSDP: FSDP2 within groups of train.dp_shard processes, replicas across them (mesh ("replicate",
    "shard"), `fully_shard` on the 2-D mesh). Every process reads its own rows of the batch, as under DDP and
    FSDP; each holds 1/dp_shard of the weights, gradients and optimizer state. train.dp_shard=0 takes torchrun's
    processes per node (LOCAL_WORLD_SIZE), the usual layout: shard inside a node, replicate across nodes."""

    name: str = "hsdp"
    hybrid: bool = True

    def degrees(self, world_size: int, tp: int, dp_shard: int = 0) -> tuple[int, int]:
        shard = dp_shard or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if shard < 1 or world_size % shard:
            raise ValueError(
                f"train.parallel=hsdp needs train.dp_shard dividing the world size {world_size} "
                f"(train.dp_shard={shard}); launch a multiple of it, or set train.dp_shard to a divisor"
            )
        return shard, 1

    def place(self, info: DistInfo, tc: Any) -> DistInfo:
        shard = self.degrees(info.world_size, tc.tp, tc.dp_shard)[0]
        if info.world_size == 1:
            return info
        from torch.distributed.device_mesh import init_device_mesh

        shape = (info.world_size // shard, shard)
        mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=("replicate", "shard"))
        return replace(info, mesh=mesh)


class FusedColwiseParallel(ColwiseParallel):
    """Column parallelism for a Linear whose output is several projections side by side, [q | k | v]: rank r
    keeps the r-th 1/tp of *each* section's rows, [q_r | k_r | v_r], so its local output splits into q, k and
    v exactly as the unsharded layer's does, for its heads. Plain column sharding would give rank 0 all of q.

    The DTensor's global view is then rank-major, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]; `canonical_rows` and
    `rank_major_rows` convert between that and the layer's own row order (checkpoints keep the layer's)."""

    def __init__(self, sections: tuple[int, ...]) -> None:
        super().__init__()
        self.sections = sections

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        module.tp_layout = (self.sections, device_mesh.size())  # read back by `fused_layouts`
        for param_name, param in list(module.named_parameters(recurse=False)):
            local = rank_major_rows(param.detach(), self.sections, device_mesh.size())
            rows = local.shape[0] // device_mesh.size()
            mine = local[device_mesh.get_local_rank() * rows : (device_mesh.get_local_rank() + 1) * rows]
            shard = DTensor.from_local(mine.contiguous(), device_mesh, [Shard(0)], run_check=False)
            module.register_parameter(param_name, nn.Parameter(shard, requires_grad=param.requires_grad))


def rank_major_rows(t: torch.Tensor, sections: tuple[int, ...], tp: int) -> torch.Tensor:
    """[s_1 | s_2 | ...] (rows by section) -> [s_1,0 s_2,0 ... | s_1,1 s_2,1 ... | ...] (rows by rank)."""
    chunks = [part.chunk(tp) for part in t.split(list(sections))]
    return torch.cat([chunk[r] for r in range(tp) for chunk in chunks])


def canonical_rows(t: torch.Tensor, sections: tuple[int, ...], tp: int) -> torch.Tensor:
    """The inverse of `rank_major_rows`."""
    per_rank = [n // tp for n in sections]
    blocks = [block.split(per_rank) for block in t.chunk(tp)]
    return torch.cat([blocks[r][i] for i in range(len(sections)) for r in range(tp)])


def fused_layouts(model: nn.Module) -> dict[str, tuple[tuple[int, ...], int]]:
    """Parameter name -> (sections, tp), for the parameters `FusedColwiseParallel` holds rank-major."""
    return {
        f"{name}.{param}": module.tp_layout
        for name, module in model.named_modules()
        if hasattr(module, "tp_layout")
        for param, _ in module.named_parameters(recurse=False)
    }


@dataclass(frozen=True)
class BlockPlan:
    """Where a family's Transformer block splits over tensor-parallel ranks (Megatron-LM's layout): attention
    by heads (fused q/k/v column-wise, the output projection row-wise), the FFN by hidden units (its input
    projections column-wise, the output row-wise). Each rank computes n_head / tp heads and d_ff / tp units;
    a row-wise layer's partial sums are all-reduced, so every rank's block output is the whole one."""

    ffn_in: tuple[str, ...]  # the FFN's input projections, column-wise
    ffn_out: str  # its output projection, row-wise

    def plan(self, block: Block) -> dict[str, ParallelStyle]:
        attn = block.attn
        q, kv = attn.n_head * attn.head_dim, attn.n_kv_heads * attn.head_dim
        styles: dict[str, ParallelStyle] = {"attn.qkv": FusedColwiseParallel((q, kv, kv))}
        styles |= {f"ffn.{name}": ColwiseParallel() for name in self.ffn_in}
        return styles | {"attn.out": RowwiseParallel(), f"ffn.{self.ffn_out}": RowwiseParallel()}


TP_PLANS: dict[str, BlockPlan] = {
    "gpt": BlockPlan(ffn_in=("fc",), ffn_out="proj"),
    "llama": BlockPlan(ffn_in=("gate", "up"), ffn_out="down"),
}


@dataclass(frozen=True)
class TensorParallel(ParallelMode):
    """Tensor parallelism over all processes (`parallelize_module` with the family's `BlockPlan`): every
    process reads the same batch, and holds 1/tp of each block's weights. Embeddings, norms and the head stay
    whole on every rank (their gradients come out equal on all of them: the column-wise layers all-reduce the
    gradient of their input). With dropout, ranks draw their heads' masks independently of one process."""

    name: str = "tp"
    sharded: bool = True
    tensor_parallel: bool = True

    def check(self, model_config: Any, tc: Any, world_size: int) -> None:
        super().check(model_config, tc, world_size)
        family = getattr(model_config, "family", "")
        if family not in TP_PLANS:
            raise ValueError(
                f"train.parallel={self.name}: the {family or 'model'} family has no tensor-parallel plan; "
                f"use one of {', '.join(TP_PLANS)}, or train.parallel=fsdp"
            )
        n_kv = getattr(model_config, "n_kv_heads", None) or model_config.n_head
        for what, n in (("n_head", model_config.n_head), ("n_kv_heads", n_kv), ("d_ff", model_config.ffn_dim)):
            if n % tc.tp:
                raise ValueError(f"train.tp={tc.tp} does not divide {what}={n}; choose train.tp among its divisors")

    def degrees(self, world_size: int, tp: int, dp_shard: int = 0) -> tuple[int, int]:
        if tp < 2 or world_size % tp:
            raise ValueError(
                f"train.parallel={self.name} needs train.tp >= 2 dividing the world size {world_size} "
                f"(train.tp={tp}); launch torchrun --nproc_per_node=N with N a multiple of train.tp"
            )
        self.check_data_parallel(world_size, tp)
        return 1, tp

    def place(self, info: DistInfo, tc: Any) -> DistInfo:
        self.degrees(info.world_size, tc.tp)
        from torch.distributed.device_mesh import init_device_mesh

        dp = info.world_size // tc.tp
        mesh = init_device_mesh(info.device.type, (dp, tc.tp), mesh_dim_names=("dp", "tp"))
        return replace(info, mesh=mesh, dp_rank=mesh["dp"].get_local_rank(), dp_size=dp)

    def check_data_parallel(self, world_size: int, tp: int) -> None:
        if world_size != tp:
            raise ValueError(
                f"train.parallel=tp needs train.tp equal to the world size {world_size} (train.tp={tp}); for "
                f"{world_size // tp} data-parallel groups of {tp} use train.parallel=fsdp+tp"
            )

    def shard(self, model: nn.Module, info: DistInfo, tc: Any) -> nn.Module:
        plan = TP_PLANS[model.config.family]
        for block in (m for m in model.modules() if isinstance(m, Block)):
            parallelize_module(block, info.mesh["tp"], plan.plan(block))
            block.attn.n_head //= tc.tp  # the heads this rank computes
            block.attn.n_kv_heads //= tc.tp
        return model

    def wrap(self, model: nn.Module, info: DistInfo) -> nn.Module:
        return model


@dataclass(frozen=True)
class FullyShardTensorParallel(TensorParallel):
    """2-D: tensor parallelism within groups of train.tp processes, FSDP across the groups (mesh ("dp", "tp")).
    Each group reads its own rows of the batch; each rank holds 1/(dp tp) of every block's weights."""

    name: str = "fsdp+tp"
    offloads: bool = True

    def check_data_parallel(self, world_size: int, tp: int) -> None:
        return None  # FSDP spans the groups

    def degrees(self, world_size: int, tp: int, dp_shard: int = 0) -> tuple[int, int]:
        return world_size // super().degrees(world_size, tp)[1], tp

    def shard(self, model: nn.Module, info: DistInfo, tc: Any) -> nn.Module:
        return FullyShard().shard(super().shard(model, info, tc), info, tc)


PARALLEL_MODES: dict[str, ParallelMode] = {
    mode.name: mode
    for mode in (ParallelMode(), FullyShard(), HybridShard(), TensorParallel(), FullyShardTensorParallel())
}


def parallel_mode(name: str) -> ParallelMode:
    if name not in PARALLEL_MODES:
        raise ValueError(f"train.parallel={name!r} is not one of {', '.join(PARALLEL_MODES)}")
    return PARALLEL_MODES[name]


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm` (torch's `clip_grad_norm_` rule:
    g <- g min(1, max_norm / (||g|| + 1e-6))); returns ||g|| before clipping.

    Gradients may be plain tensors and DTensors on different meshes at once (tensor parallelism keeps norms and
    embeddings whole), which one torch call cannot mix: the norm of each group of alike gradients is taken by
    torch (a DTensor's over all its shards), and ||g|| = sqrt(sum over groups of ||g_group||^2)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    if not groups:
        return 0.0
    norms = [torch.nn.utils.get_total_norm(grads) for grads in groups.values()]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
    for grads in groups.values():
        torch._foreach_mul_(grads, coef)
    return total.item()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the trainable parameters, their gradients and the optimizer state: the local
    shard of each DTensor, the whole tensor otherwise. Gradients are counted as the local parameter shards they
    mirror (a backward writes exactly that layout; between steps they are freed), so the count is the same
    whenever it is taken; optimizer state is counted once it exists (after the first step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(_local(p).numel() * p.element_size() for p in params)
    optim_bytes = sum(
        _local(value).numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.ndim > 0  # a step counter is a 0-d tensor: not memory
    )
    return {"params": param_bytes, "grads": param_bytes, "optimizer": optim_bytes}
