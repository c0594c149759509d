"""FSDP2 with two CPU processes (gloo) against the single-process run as the oracle: the same losses, half the
per-rank state, sharded checkpoints that resume exactly at 2 ranks and reshard to 1, and `lmforge convert`.
The multi-process tests share two runs (about 25 s) and are marked slow; the bad-input tests are in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.hf.load import load_model
from lmforge.models import build_model
from lmforge.train.config import TrainSection
from lmforge.train.parallel import parallel_mode
from lmforge.train.sharded import read_sharded, write_sharded

PRETRAIN = ["-m", "lmforge.commands.pretrain"]
ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TWO_BLOCKS = '{"n_layer": 2, "n_head": 2, "d_model": 32}'  # FSDP shards block by block: have more than one


def _flags(run_flags, out: Path, name: str, **changes) -> list[str]:
    common = dict(train__max_steps=6, train__save_every=3, train__eval_every=3, model__overrides=TWO_BLOCKS)
    return run_flags(out, train__name=name, **(common | changes))


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _trajectory(run: Path) -> list[tuple]:
    """What a resumed run must repeat exactly: each logged loss (and the train steps' lr and gradient norm)."""
    return [(r["step"], r["split"], r["loss"], r.get("lr"), r.get("grad_norm")) for r in _records(run)]


def _assert_same_losses(oracle: Path, run: Path) -> None:
    one, two = _records(oracle), _records(run)
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["split"])


def _rewind(run: Path, to: Path, step: int) -> None:
    """A copy of `run` as if it had been killed right after saving `step` (later checkpoints gone)."""
    shutil.copytree(run, to)
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest.json").write_text(json.dumps({"step": step, "path": f"step_{step:08d}"}))


@pytest.fixture(scope="module")
def runs(run_flags, tmp_path_factory):
    """The oracle (one process, batch 4) and an FSDP run (two processes, batch 2 each), 6 steps each."""
    out = tmp_path_factory.mktemp("parallel")
    _run([*ONE, *PRETRAIN, *_flags(run_flags, out, "single", train__batch_size=4)])
    done = _run([*TWO, *PRETRAIN, *_flags(run_flags, out, "fsdp", train__batch_size=2, train__parallel="fsdp")])
    assert "2 process(es) (fsdp)" in done.stderr
    return out


@pytest.mark.slow
def test_fsdp_follows_the_single_process_trajectory(runs):
    _assert_same_losses(runs / "single", runs / "fsdp")


@pytest.mark.slow
def test_an_fsdp_rank_holds_about_half_of_what_a_ddp_rank_holds(runs):
    """DDP replicates: each of its ranks holds what the single process holds."""
    ddp = json.loads((runs / "single" / "summary.json").read_text())["state_bytes_per_rank"]
    fsdp = json.loads((runs / "fsdp" / "summary.json").read_text())["state_bytes_per_rank"]
    assert ddp["optimizer"] == 2 * ddp["params"]  # AdamW: two moments per weight
    ratio = sum(fsdp.values()) / sum(ddp.values())
    assert 0.45 <= ratio <= 0.55, ratio


@pytest.mark.slow
def test_fsdp_checkpoints_hold_one_shard_per_rank(runs):
    step = runs / "fsdp" / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in (step / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step / "model.safetensors").exists() and not (step / "optimizer.pt").exists()
    assert (step / "config.json").is_file() and (step / "trainer_state.json").is_file()


@pytest.mark.slow
def test_sharded_resume_at_two_ranks_continues_exactly(runs, run_flags):
    _rewind(runs / "fsdp", runs / "fsdp-resumed", step=3)
    flags = _flags(run_flags, runs, "fsdp-resumed", train__batch_size=2, train__parallel="fsdp")
    done = _run([*TWO, *PRETRAIN, *flags, "--resume"])
    assert "resumed from" in done.stderr
    assert _trajectory(runs / "fsdp-resumed") == _trajectory(runs / "fsdp")  # bit-identical


@pytest.mark.slow
def test_resharding_two_ranks_to_one_process_is_exact(runs, run_flags):
    _rewind(runs / "fsdp", runs / "one", step=3)
    flags = _flags(run_flags, runs, "one", train__batch_size=4, train__parallel="fsdp")
    done = _run([*ONE, *PRETRAIN, *flags, "--resume"])
    assert "resumed from" in done.stderr and "1 process(es)" in done.stderr
    assert _trajectory(runs / "one")[:4] == _trajectory(runs / "fsdp")[:4]  # steps 1-3 and the eval at 3: kept
    _assert_same_losses(runs / "single", runs / "one")


@pytest.mark.slow
def test_convert_turns_a_sharded_checkpoint_into_a_model_folder(runs, tmp_path):
    step = runs / "fsdp" / "checkpoints" / "step_00000006"
    assert main(["convert", str(step), str(tmp_path / "model"), "--to", "lmforge"]) == 0
    converted = load_model(tmp_path / "model").state_dict()
    oracle = load_model(runs / "single" / "checkpoints" / "step_00000006").state_dict()
    assert converted.keys() == oracle.keys()
    for name, tensor in oracle.items():
        torch.testing.assert_close(converted[name], tensor, atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------- bad input, before training


def test_unknown_parallel_mode_is_named():
    with pytest.raises(ValueError, match="train.parallel='zero3' is not one of ddp, fsdp"):
        parallel_mode("zero3")


@pytest.mark.parametrize(
    ("mode", "changes", "message"),
    [("fsdp", {"tp": 2}, "train.tp=2 needs train.parallel=tp"), ("ddp", {"cpu_offload": True}, "cpu_offload needs")],
)
def test_settings_a_mode_cannot_use_are_refused(mode, changes, message):
    with pytest.raises(ValueError, match=message):
        parallel_mode(mode).check(None, TrainSection(**changes), world_size=2)


def test_a_sharded_checkpoint_of_another_model_is_refused(tmp_path):
    saved = build_model("gpt", vocab_size=67, n_layer=1, n_head=2, d_model=32)
    write_sharded(tmp_path, saved, optimizer=None)
    other = build_model("gpt", vocab_size=67, n_layer=1, n_head=2, d_model=64)
    with pytest.raises(ValueError, match="does not match the model.*wrong shape.*belongs to another model"):
        read_sharded(tmp_path, other)
    same = build_model("gpt", vocab_size=67, n_layer=1, n_head=2, d_model=32)
    read_sharded(tmp_path, same)
    for (name, a), b in zip(saved.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
