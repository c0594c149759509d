"""How a run spreads its model over processes: one object per `train.parallel` mode, on PyTorch's own engine.

    ddp    every process holds the whole model, optimizer state and gradients; DDP all-reduces gradients
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`) per Transformer block, then the root: each of the N
           processes keeps 1/N of every parameter, gradient and optimizer moment (row-sharded DTensors);
           a block's full weights exist only while it runs (all-gather before its forward and backward,
           reduce-scatter of its gradients after)

Per rank, with P parameters of b bytes and Adam's two moments, DDP holds P b (weights) + P b (gradients)
+ 2 P b (moments) = 4 P b; FSDP over N ranks holds 4 P b / N plus the unsharded weights of the one block
being computed. `state_bytes` counts what a rank actually holds.

The data-parallel arithmetic stays the loop's (`lmforge.train.loop`): each process takes its rows of the global
batch, scales its summed loss by world / units, and the reduction averages over processes. FSDP2's
reduce-scatter averages just like DDP's all-reduce, so one process with batch N B and N processes with batch B
take the same steps. Sharded runs save sharded checkpoints (`lmforge.train.checkpoint`, DCP).

A mode checks the run before anything is built (`check`), builds the device mesh (`place`), shards the model
in place before the optimizer is created (`shard`: the optimizer must see the sharded parameters) and may
wrap it for the forward pass (`wrap`: DDP).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.nn import Block
from lmforge.train.distributed import DistInfo, wrap_model


@dataclass(frozen=True)
class ParallelMode:
    """Data parallelism with whole replicas (DDP): the default, and the base the sharded modes share."""

    name: str = "ddp"
    sharded: bool = False  # whether checkpoints are written shard by shard (DCP) by every rank
    offloads: bool = False  # whether train.cpu_offload means something here
    tensor_parallel: bool = False  # whether train.tp means something here

    def check(self, model_config: Any, tc: Any, world_size: int) -> None:
        """Refuse a run this mode cannot do, in one line, before training starts."""
        if tc.cpu_offload and not self.offloads:
            raise ValueError(f"train.cpu_offload needs train.parallel=fsdp (it offloads FSDP shards), not {self.name}")
        if tc.tp != 1 and not self.tensor_parallel:
            raise ValueError(f"train.tp={tc.tp} needs train.parallel=tp or fsdp+tp, not {self.name}")

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

        options: dict[str, Any] = {"mesh": info.mesh["dp"] if "dp" in (info.mesh.mesh_dim_names or ()) else info.mesh}
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


PARALLEL_MODES: dict[str, ParallelMode] = {mode.name: mode for mode in (ParallelMode(), FullyShard())}


def parallel_mode(name: str) -> ParallelMode:
    if name not in PARALLEL_MODES:
        raise ValueError(f"train.parallel={name!r} is not one of {', '.join(PARALLEL_MODES)}")
    return PARALLEL_MODES[name]


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
