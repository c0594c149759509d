import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.train.distributed import (
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    resolve_device,
    seed_everything,
    unwrap_model,
    wrap_model,
)

# Each rank: sum its rank+1 over the group, then one DDP step on its half of a batch; rank 0 also computes
# the full-batch gradient in a plain (unwrapped) copy, the single-process oracle.
WORKER = """
import json, os, sys
import torch
from torch import nn
from lmforge.train.distributed import (all_reduce_sum, barrier, cleanup, init_distributed, seed_everything,
                                       unwrap_model, wrap_model)

info = init_distributed("cpu")
seed_everything(0)
model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
reference.load_state_dict(model.state_dict())
ddp = wrap_model(model, info)
x, y = torch.randn(8, 6), torch.randn(8, 1)  # the same on every rank (same seed)
half = slice(4 * info.rank, 4 * info.rank + 4)
nn.functional.mse_loss(ddp(x[half]), y[half]).backward()
nn.functional.mse_loss(reference(x), y).backward()
total = all_reduce_sum(torch.tensor([float(info.rank + 1)]), info)
barrier(info)
result = {
    "rank": info.rank, "world_size": info.world_size, "is_main": info.is_main, "device": str(info.device),
    "wrapped": type(ddp).__name__, "unwrapped_is_model": unwrap_model(ddp) is model, "sum": total.item(),
    "grads": [p.grad.tolist() for p in model.parameters()],
    "reference": [p.grad.tolist() for p in reference.parameters()],
}
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump(result, f)
cleanup(info)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sum_and_ddp_averages_gradients_like_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2 and result["is_main"] == (rank == 0)
        assert result["device"] == "cpu" and result["wrapped"] == "DistributedDataParallel"
        assert result["unwrapped_is_model"]
        assert result["sum"] == 3.0
        for got, expected in zip(result["grads"], results[0]["reference"], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    model = nn.Linear(2, 2)
    assert wrap_model(model, info) is model and unwrap_model(model) is model
    t = torch.tensor([2.0])
    assert all_reduce_sum(t, info) is t and t.item() == 2.0
    barrier(info)
    cleanup(info)
    expected = "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert init_distributed("auto").device == torch.device(expected)


def test_bad_environment_and_devices_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_seed_everything_repeats_every_generator_and_sets_determinism():
    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    seed_everything(7)
    first = draws()
    cublas = os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    seed_everything(7, deterministic=True)
    try:
        assert draws() == first
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        seed_everything(0, deterministic=False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG")
        if cublas is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
    assert not torch.are_deterministic_algorithms_enabled()
