"""The pieces of `lmforge.train.parallel` and `lmforge.train.sharded` that need no second process: the
rank-major row order of fused q/k/v, gradient clipping against torch's, and a whole checkpoint refused by a
sharded model (FSDP2 on a one-rank gloo group). Multi-process runs: tests/pretrain/test_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lmforge.models import build_model
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel import canonical_rows, clip_grad_norm, rank_major_rows
from lmforge.train.sharded import read_sharded, write_sharded

TINY = dict(vocab_size=67, n_layer=2, n_head=2, d_model=32)


def test_rank_major_rows_give_each_rank_its_rows_of_every_section():
    rows = torch.arange(8).unsqueeze(1)  # q = rows 0-3 (4 heads), k = 4-5, v = 6-7 (GQA: 2 heads each)
    major = rank_major_rows(rows, (4, 2, 2), tp=2)
    assert major.squeeze(1).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]  # rank 0: q0 q1 k0 v0 | rank 1: q2 q3 k1 v1
    assert torch.equal(canonical_rows(major, (4, 2, 2), tp=2), rows)


def test_clipping_matches_torch_on_plain_gradients():
    torch.manual_seed(0)
    ours, theirs = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], []
    for p in ours:
        p.grad = torch.randn_like(p) * 10
        theirs.append(torch.nn.Parameter(p.detach().clone()))
        theirs[-1].grad = p.grad.clone()
    norm = clip_grad_norm(ours, 1.0)
    assert norm == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, 1.0).item(), rel=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    dist.destroy_process_group()


def _sharded_gpt(mesh, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("gpt", **TINY)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def test_a_whole_checkpoint_is_refused_by_a_sharded_model(one_rank_group, tmp_path):
    model = build_model("gpt", **TINY)
    path = save_checkpoint(tmp_path, 1, model, build_optimizer(model, OptimConfig()), None, {})
    with pytest.raises(ValueError, match="holds whole weights .* resume it with train.parallel=ddp"):
        load_checkpoint(path, _sharded_gpt(one_rank_group))


def test_a_sharded_model_and_its_optimizer_round_trip_through_dcp(one_rank_group, tmp_path):
    model = _sharded_gpt(one_rank_group)
    optimizer = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 67, (2, 8))).logits.sum().backward()
    optimizer.step()
    write_sharded(tmp_path, model, optimizer)
    other = _sharded_gpt(one_rank_group, seed=1)  # other weights, no optimizer state yet
    other_optimizer = build_optimizer(other, OptimConfig())
    read_sharded(tmp_path, other, other_optimizer)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        saved, loaded = optimizer.state[p], other_optimizer.state[q]
        assert torch.equal(saved["exp_avg_sq"].full_tensor(), loaded["exp_avg_sq"].full_tensor())
