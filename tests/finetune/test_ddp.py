"""Fine-tuning runs the pretraining loop, DDP and FSDP included: two CPU processes (gloo) follow the trajectory
of one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmforge.hf.load import load_model

FINETUNE = ["-m", "lmforge.commands.finetune"]


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _single_run(tmp_path, sentiment_file, model: str = "bert-tiny") -> list[str]:
    """The flags both runs share, after the one-process run (batch 8) that is the oracle."""
    sentiment_file(tmp_path / "train.jsonl", 80, seed=0)
    common = [
        "--task=classification", f"--model={model}", f"--data={tmp_path / 'train.jsonl'}", "--epochs=0",
        "--max-steps=8", "--eval-every=4", "--train.grad_accum=2", "--train.log_every=1", "--model.dropout=0",
        "--train.progress=false", "--train.tensorboard=false", "--model.vocab_size=200", f"--out={tmp_path}",
    ]  # fmt: skip
    single = [*common, "--train.name=single", "--train.batch_size=8"]
    done = subprocess.run([sys.executable, *FINETUNE, *single], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [*common, f"--model.tokenizer={tmp_path / 'single' / 'tokenizer'}"]  # the same ids in both runs


def _two_processes(tmp_path, flags: list[str], name: str, batch: int = 4) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = [*flags, f"--train.name={name}", f"--train.batch_size={batch}"]
    done = subprocess.run([*torchrun, *FINETUNE, *run], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _records(tmp_path / "single"), _records(tmp_path / name)
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]  # rank 0 logs once
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["split"])
    assert (tmp_path / name / "model" / "task.json").is_file()


def test_two_processes_follow_the_single_process_trajectory(tmp_path, sentiment_file):
    _two_processes(tmp_path, _single_run(tmp_path, sentiment_file), "ddp")


@pytest.mark.slow
def test_fsdp_follows_the_single_process_trajectory_and_saves_the_whole_model(tmp_path, sentiment_file):
    _two_processes(tmp_path, [*_single_run(tmp_path, sentiment_file), "--train.parallel=fsdp"], "fsdp")
    single, fsdp = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("single", "fsdp"))
    assert fsdp["loss"] == pytest.approx(single["loss"], abs=1e-5)  # the final evaluation ran on the gathered model
    saved = {name: load_model(tmp_path / name / "model").state_dict() for name in ("single", "fsdp")}
    assert saved["fsdp"].keys() == saved["single"].keys()
    for name, tensor in saved["single"].items():
        torch.testing.assert_close(saved["fsdp"][name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_tensor_parallel_fine_tuning_follows_one_process_and_saves_the_layers_own_rows(tmp_path, sentiment_file):
    """Both processes read the whole batch of 8 and compute one of llama-tiny's two K/V groups each; the saved
    `model/` holds q/k/v in the layer's own row order (the ranks hold them rank-major), so it predicts as the
    one-process model does."""
    flags = _single_run(tmp_path, sentiment_file, model="llama-tiny")
    _two_processes(tmp_path, [*flags, "--train.parallel=tp", "--train.tp=2"], "tp", batch=8)
    saved = {name: load_model(tmp_path / name / "model").state_dict() for name in ("single", "tp")}
    for name, tensor in saved["single"].items():
        torch.testing.assert_close(saved["tp"][name], tensor, atol=1e-5, rtol=0, msg=name)
