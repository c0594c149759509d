"""The planner against what a model holds: DDP's bytes measured on a real model after an AdamW step, the
activation estimate of `lmforge.train.memory` at tp=1, the sharding arithmetic, and the command. (FSDP and TP
against real sharded runs: tests/pretrain/test_parallel.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.models import build_config, build_model
from lmforge.models.build import meta_model
from lmforge.train.memory import activation_bytes
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel import parallel_mode, state_bytes
from lmforge.train.plan import local_parameters, plan_memory

TINY = dict(vocab_size=67, n_layer=2, n_head=2, d_model=32)


def test_ddp_plan_equals_the_bytes_a_trained_model_holds():
    model = build_model("gpt", **TINY)
    optimizer = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 67, (2, 8))).logits.sum().backward()
    optimizer.step()
    planned = plan_memory(model.config, parallel_mode("ddp"), world_size=4, tp=1, batch=2, seq_len=8)
    assert state_bytes(model, optimizer) == {
        "params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer
    }  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_at_tp_1_are_the_run_time_check_s_estimate(checkpointing):
    config = build_config("llama-tiny")
    planned = plan_memory(config, parallel_mode("fsdp"), world_size=2, tp=1, batch=4, seq_len=64)
    got = planned.activations_checkpointed if checkpointing else planned.activations
    assert got == activation_bytes(meta_model(config), 4, 64, "bfloat16", checkpointing)


def test_sharding_divides_the_parameters_rank_0_holds():
    config = build_config("llama-tiny")
    whole = sum(p.numel() for p in meta_model(config).parameters())
    assert local_parameters(config, parallel_mode("ddp"), 8, 1) == whole
    fsdp = local_parameters(config, parallel_mode("fsdp"), 8, 1)
    assert whole / 8 <= fsdp < whole / 8 * 1.05  # ceil(d / 8) rows per tensor
    tp = local_parameters(config, parallel_mode("tp"), 2, 2)
    assert whole / 2 < tp < whole  # blocks halved, embeddings and norms whole
    assert local_parameters(config, parallel_mode("fsdp+tp"), 8, 2) < tp / 3


def test_plan_command_prints_the_layout_and_whether_it_fits(capsys):
    argv = ["plan", "--model", "llama-tiny", "--gpus", "4", "--seq-len", "128", "--batch", "2", "--json"]
    assert main([*argv, "--gpu-mem", "1", "--parallel", "fsdp+tp", "--tp", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layout"] == {"gpus": 4, "parallel": "fsdp+tp", "fsdp": 2, "tp": 2, "data_parallel": 2}
    assert result["tokens_per_step"] == 2 * 128 * 2
    assert main([*argv, "--gpu-mem", "0.0001"]) == 1  # fits nowhere: status 1


def test_plan_refuses_a_degree_the_heads_do_not_allow(capsys):
    argv = ["plan", "--model", "llama-tiny", "--gpus", "3", "--gpu-mem", "8", "--seq-len", "8", "--batch", "1"]
    assert main([*argv, "--parallel", "tp", "--tp", "3"]) == 2
    assert "train.tp=3 does not divide" in capsys.readouterr().err
