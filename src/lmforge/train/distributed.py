"""Data-parallel training across processes (torchrun), and seeding.

`torchrun --nproc_per_node=N ...` starts N copies of the script and tells each who it is through the
environment: RANK (0..WORLD_SIZE-1 over all machines), WORLD_SIZE, LOCAL_RANK (the index on this machine,
which picks the GPU), MASTER_ADDR and MASTER_PORT (where rank 0 listens). Without them, the script is a
single process and every function here is a no-op that returns its input.

DistributedDataParallel keeps one model copy per process; each process computes gradients on its own
slice of the batch, and DDP averages them (an all-reduce sum divided by WORLD_SIZE) during backward, so
every copy takes the same step: with equal slices, the average of per-slice mean-loss gradients is the
full-batch gradient. Backends: NCCL between GPUs, Gloo between CPU processes.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    """Who this process is. `dp_rank` / `dp_size` place it among the data-parallel replicas: every process
    (DDP, FSDP) unless tensor parallelism makes groups of processes share one batch (`lmforge.train.parallel`
    sets them, with the device `mesh`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    dp_rank: int = -1  # -1: the same as rank
    dp_size: int = 0  # 0: the same as world_size
    mesh: Any = None  # a torch DeviceMesh when the run shards its model

    def __post_init__(self) -> None:
        if self.dp_rank < 0:
            self.dp_rank = self.rank
        if self.dp_size < 1:
            self.dp_size = self.world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:<local_rank> when CUDA is available, else mps, else cpu; "cuda" -> cuda:<local_rank>;
    anything else as given, refused when its backend is unavailable here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device=auto or cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % torch.cuda.device_count())
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available here; use device=auto or cpu")
    return resolved


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun described in the environment (gloo on CPU, nccl on CUDA), or return
    a single-process DistInfo when WORLD_SIZE is absent or 1. Calling it again in the same process reuses
    the existing group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolved, is_main=True)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}; launch with torchrun")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {missing} are not set; launch with torchrun --nproc_per_node=N")
    if resolved.type == "mps":
        raise ValueError("multi-process training on MPS is not supported (no backend); use one process or device=cpu")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
            device_id=resolved if resolved.type == "cuda" else None,
        )  # fmt: skip
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved, is_main=rank == 0)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `model` (already on info.device) when there are several processes;
    the model itself otherwise. Use `unwrap_model` to reach the bare model (config, saving)."""
    if info.world_size <= 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel or Opacus's DPDDP (`.module`) and torch.compile
    (`._orig_mod`) wrappers."""
    dpddp = sys.modules.get("opacus.distributed")  # only a private run, which imported it, can hold one
    wrappers = (DistributedDataParallel,) + ((dpddp.DifferentiallyPrivateDistributedDataParallel,) if dpddp else ())
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextmanager
def gradient_sync_paused(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without the data-parallel reduction, for the micro-batches before the
    last: DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`; nothing for a model that does not
    reduce (one process, tensor parallelism alone)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
        yield


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over all processes, in place (every rank ends with the total); returns `t`."""
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (e.g. rank 0 finished writing a checkpoint)."""
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (call once at the end of a run, on every rank). A barrier first, so no rank
    closes its connections while another still talks to it (gloo aborts the peer when that happens)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every GPU).

    deterministic=True also makes torch pick deterministic kernels (and raise on ops that have none),
    disables cuDNN autotuning, and sets CUBLAS_WORKSPACE_CONFIG=:4096:8, which cuBLAS needs for
    reproducible matmuls on CUDA >= 10.2 (it must be set before the first cuBLAS call, so call this early).
    deterministic=False sets torch's deterministic mode back off.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
