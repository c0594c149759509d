"""FSDP2, tensor parallelism and both on a 2x2 mesh, with CPU processes (gloo), against the single-process run as
the oracle: the same losses, half the per-rank state under FSDP, sharded checkpoints that resume exactly at 2
ranks and reshard to 1, and `lmforge convert`. The multi-process tests share their runs (25-40 s each) and are
marked slow; the bad-input tests are in-process and fast."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.hf.files import read_config
from lmforge.hf.load import lmforge_config, load_model
from lmforge.models import build_model
from lmforge.train.config import TrainSection
from lmforge.train.distributed import DistInfo
from lmforge.train.parallel import parallel_mode
from lmforge.train.plan import plan_memory
from lmforge.train.sharded import read_sharded, write_sharded

PRETRAIN = ["-m", "lmforge.commands.pretrain"]
ONE = [sys.executable]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
FOUR = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
TWO_BLOCKS = '{"n_layer": 2, "n_head": 2, "d_model": 32}'  # FSDP shards block by block: have more than one


GQA_LLAMA = '{"n_layer": 2, "n_head": 4, "n_kv_heads": 2, "d_model": 32}'  # 2 query heads per K/V head


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


@pytest.fixture(scope="module")
def tp_run(runs, run_flags):
    """Tensor parallelism over two processes: both read the whole batch of 4 and compute one head each."""
    flags = _flags(run_flags, runs, "tp", train__batch_size=4, train__parallel="tp", train__tp=2)
    assert "2 process(es) (tp)" in _run([*TWO, *PRETRAIN, *flags]).stderr
    return runs / "tp"


@pytest.mark.slow
def test_fsdp_follows_the_single_process_trajectory(runs):
    _assert_same_losses(runs / "single", runs / "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changes", "tolerance"),
    [({"train__cpu_offload": True}, 1e-5), ({"train__dtype": "bfloat16"}, 1e-2)],  # bf16: ~3 significant digits
    ids=["cpu-offload", "bf16-params-fp32-reduce"],
)
def test_fsdp_offload_and_mixed_precision_follow_the_fp32_run(runs, run_flags, changes, tolerance):
    name = next(iter(changes)).removeprefix("train__")
    flags = _flags(run_flags, runs, name, train__batch_size=2, train__parallel="fsdp", **changes)
    _run([*TWO, *PRETRAIN, *flags])
    for a, b in zip(_records(runs / "single"), _records(runs / name), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=tolerance), (a["step"], a["split"])


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


@pytest.mark.slow
def test_tensor_parallel_follows_the_single_process_trajectory(runs, tp_run):
    _assert_same_losses(runs / "single", tp_run)


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_keeps_the_layers_own_row_order(runs, tp_run, run_flags):
    """Each rank holds [q_r | k_r | v_r] of the fused projection; the checkpoint holds [q | k | v], so one
    process resumes it (same losses as the oracle's)."""
    _rewind(tp_run, runs / "tp-one", step=3)
    _run([*ONE, *PRETRAIN, *_flags(run_flags, runs, "tp-one", train__batch_size=4), "--resume"])
    _assert_same_losses(runs / "single", runs / "tp-one")


@pytest.mark.slow
def test_fsdp_with_tensor_parallel_on_a_2x2_mesh_follows_one_process_with_gqa(run_flags, tmp_path):
    llama = dict(model__name="llama", model__overrides=GQA_LLAMA)
    _run([*ONE, *PRETRAIN, *_flags(run_flags, tmp_path, "single", train__batch_size=4, **llama)])
    flags = _flags(run_flags, tmp_path, "2d", train__batch_size=2, train__parallel="fsdp+tp", train__tp=2, **llama)
    assert "4 process(es) (fsdp+tp)" in _run([*FOUR, *PRETRAIN, *flags]).stderr
    _assert_same_losses(tmp_path / "single", tmp_path / "2d")


@pytest.mark.slow
def test_hybrid_sharding_on_a_2x2_mesh_follows_one_process_and_reshards_to_it(runs, run_flags):
    """HSDP over 4 processes: 2 replicas of 2 shards, one row of the batch each. Each rank holds what an FSDP
    rank of a 2-process run holds, and its checkpoint resumes in one process."""
    flags = _flags(run_flags, runs, "hsdp", train__batch_size=1, train__parallel="hsdp", train__dp_shard=2)
    assert "4 process(es) (hsdp)" in _run([*FOUR, *PRETRAIN, *flags]).stderr
    _assert_same_losses(runs / "single", runs / "hsdp")
    held = {name: json.loads((runs / name / "summary.json").read_text()) for name in ("fsdp", "hsdp")}
    assert held["hsdp"]["state_bytes_per_rank"] == held["fsdp"]["state_bytes_per_rank"]
    _rewind(runs / "hsdp", runs / "hsdp-one", step=3)
    _run([*ONE, *PRETRAIN, *_flags(run_flags, runs, "hsdp-one", train__batch_size=4), "--resume"])
    _assert_same_losses(runs / "single", runs / "hsdp-one")


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=`rank` (Linux: its children's environments)."""
    import psutil

    for child in psutil.Process(torchrun.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == str(rank):
                return child.pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


@pytest.mark.slow
def test_kill_9_of_one_rank_stops_the_job_and_resume_continues_exactly(run_flags, tmp_path):
    """SIGKILL of rank 1 right after a sharded checkpoint: torchrun stops the whole job with an error, and
    `--resume` from the last checkpoint logs exactly the losses of an uninterrupted run."""
    long = dict(train__batch_size=2, train__parallel="fsdp", train__max_steps=60, train__save_every=10)
    _run([*TWO, *PRETRAIN, *_flags(run_flags, tmp_path, "whole", **long)])
    job = subprocess.Popen(
        [*TWO, *PRETRAIN, *_flags(run_flags, tmp_path, "killed", **long)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    latest, deadline = tmp_path / "killed" / "checkpoints" / "latest.json", time.monotonic() + 240
    while not latest.exists():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(_rank_pid(job, rank=1), signal.SIGKILL)
    stderr = job.communicate(timeout=240)[1]
    assert job.returncode != 0, stderr[-2000:]
    assert "SIGKILL" in stderr, stderr[-2000:]
    saved = json.loads(latest.read_text())["step"]
    assert 0 < saved < 60, saved  # killed before the end
    done = _run([*TWO, *PRETRAIN, *_flags(run_flags, tmp_path, "killed", **long), "--resume"])
    assert "resumed from" in done.stderr
    assert _trajectory(tmp_path / "killed") == _trajectory(tmp_path / "whole")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode", "tp"), [("fsdp", "fsdp", 1), ("tp", "tp", 2)])
def test_the_planner_counts_the_bytes_a_sharded_rank_holds(runs, tp_run, name, mode, tp):
    """`lmforge plan`'s parameters, gradients and AdamW state equal rank 0's, measured in the run (summary.json)."""
    step = runs / name / "checkpoints" / "step_00000006"
    config = lmforge_config(read_config(step), step)
    measured = json.loads((runs / name / "summary.json").read_text())["state_bytes_per_rank"]
    planned = plan_memory(config, parallel_mode(mode), world_size=2, tp=tp, batch=2, seq_len=32)
    assert measured == {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}


# ---------------------------------------------------------------- bad input, before training


def test_unknown_parallel_mode_is_named():
    with pytest.raises(ValueError, match="train.parallel='zero3' is not one of ddp, fsdp, hsdp, tp, fsdp\\+tp"):
        parallel_mode("zero3")


@pytest.mark.parametrize(
    ("mode", "changes", "message"),
    [
        ("fsdp", {"tp": 2}, "train.tp=2 needs train.parallel=tp"),
        ("ddp", {"cpu_offload": True}, "cpu_offload needs"),
        ("fsdp", {"dp_shard": 2}, "train.dp_shard=2 needs train.parallel=hsdp"),
    ],
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


@pytest.mark.parametrize(
    ("mode", "world_size", "message"),
    [
        ("tp", 3, "needs train.tp >= 2 dividing the world size 3"),
        ("fsdp+tp", 3, "needs train.tp >= 2 dividing the world size 3"),
        ("tp", 4, "train.tp equal to the world size 4 .*use train.parallel=fsdp\\+tp"),
        ("hsdp", 3, "needs train.dp_shard dividing the world size 3 \\(train.dp_shard=2\\)"),
    ],
)
def test_a_mesh_the_world_size_does_not_fit_is_refused(mode, world_size, message):
    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"), is_main=True)
    tc = TrainSection(tp=1, dp_shard=2) if mode == "hsdp" else TrainSection(tp=2)
    with pytest.raises(ValueError, match=message):
        parallel_mode(mode).place(info, tc)


@pytest.mark.parametrize(
    ("family", "values", "message"),
    [
        ("gpt", {"n_head": 3, "d_model": 48}, "train.tp=2 does not divide n_head=3"),
        ("llama", {"n_head": 4, "n_kv_heads": 1, "d_model": 32}, "train.tp=2 does not divide n_kv_heads=1"),
        ("bert", {}, "the bert family has no tensor-parallel plan; use one of gpt, llama"),
    ],
)
def test_heads_the_tp_degree_does_not_divide_and_families_without_a_plan_are_refused(family, values, message):
    config = build_model(family, vocab_size=67, n_layer=1, **values).config
    with pytest.raises(ValueError, match=message):
        parallel_mode("fsdp+tp").check(config, TrainSection(tp=2), world_size=4)
