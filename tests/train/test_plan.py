"""The planner against what a model holds: DDP's bytes measured on a real model after an AdamW step, the traced
activations against a real forward pass's saved tensors, the sharding arithmetic, and the command. (FSDP and TP
against real sharded runs: tests/pretrain/test_parallel.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.models import build_config, build_model
from lmforge.models.build import meta_model
from lmforge.train.activations import enable_activation_checkpointing
from lmforge.train.memory import saved_tensor_bytes
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallel import parallel_mode, state_bytes
from lmforge.train.plan import local_parameters, plan_memory, traced_activations

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


@pytest.mark.parametrize("family", ["gpt-tiny", "llama-tiny"])
def test_traced_activations_equal_what_a_real_forward_pass_keeps(family):
    """The plan traces 16-64-token sequences on fake tensors of one- and two-layer models and extends them to
    4 layers and 96 tokens; a real 4-layer model on real tokens keeps exactly that (with checkpointing: the
    block inputs and the loss's tensors, plus one block's internals while it is recomputed)."""
    config = build_config(family, dropout=0.0)
    planned = plan_memory(config, parallel_mode("fsdp"), world_size=2, tp=1, batch=3, seq_len=96, dtype="float32")
    torch.manual_seed(0)
    model = build_model(family, dropout=0.0).train()
    ids = torch.randint(0, config.vocab_size, (3, 96))
    real = saved_tensor_bytes(model, {"input_ids": ids, "labels": ids}, lambda _, block: block or "outside")
    assert planned.activations == sum(real.values())
    biggest_block = max(n for name, n in real.items() if name != "outside")
    enable_activation_checkpointing(model)
    kept = saved_tensor_bytes(model, {"input_ids": ids, "labels": ids})
    assert planned.activations_checkpointed == kept["block"] + kept["outside"] + biggest_block
    assert planned.activations_checkpointed < planned.activations / 2


def test_tensor_parallel_splits_the_attention_and_ffn_activations_only():
    config = build_config("llama-tiny")
    one, two = (traced_activations(config, 2, 64, "bfloat16", tp)[0] for tp in (1, 2))
    assert one / 2 < two < one  # norms, residuals, embeddings and logits stay whole on every rank


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
