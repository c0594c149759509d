"""Scale-out figures (issue "Scale-out"), each against its reference measured in the same run, on CPU processes
(torchrun, gloo, one thread each):

1. losses: a 4-layer, 128-wide llama (GQA: 4 query heads, 2 K/V heads) on tiny Shakespeare, 50 steps, fp32,
   global batch 8 x 64 tokens: one process (the oracle) against FSDP, TP and FSDP+TP on 2 processes and
   FSDP+TP and HSDP on a 2 x 2 mesh (4 processes). Max |loss difference| over every logged step and evaluation;
   target <= 1e-5.
2. state memory: parameters + gradients + AdamW state a rank holds (summary.json, measured on the running
   model) under DDP and FSDP on 2 processes; target FSDP <= 0.55x DDP. `lmforge plan`'s bytes beside them.
3. activations: `lmforge plan`'s traced activation bytes against the memory a real forward pass takes
   (resident set size after the forward, graph alive, minus before; a subprocess with glibc's mmap threshold
   lowered so freed temporaries go back to the OS) for gpt and llama at 4 x 256, batch 8 x 512 tokens, fp32;
   target within 10%.
4. torchtitan's published Llama-3-8B figure (64 A100s, FSDP, seq 8192, local batch 1: ~2,900 tok/s per GPU
   at 57-58% MFU) beside `lmforge plan` for the same layout: memory per rank and the tok/s its FLOPs count
   gives at that MFU.

    .venv/bin/python benchmarks/bench_parallel.py [--steps 50] [--only losses,memory,activations,titan]

Results: stdout and benchmarks/results/parallel.json; runs under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = ROOT / "benchmarks" / "results"
PRETRAIN = ["-m", "lmforge.commands.pretrain"]
LLAMA = '{"n_layer": 4, "n_head": 4, "n_kv_heads": 2, "d_model": 128, "dropout": 0.0}'
# name: (processes, per-process batch, extra flags); the global batch is 8 in every run
LAYOUTS = {
    "single": (1, 8, {}),
    "ddp": (2, 4, {}),
    "fsdp": (2, 4, {"train.parallel": "fsdp"}),
    "tp": (2, 8, {"train.parallel": "tp", "train.tp": 2}),
    "fsdp+tp-1x2": (2, 8, {"train.parallel": "fsdp+tp", "train.tp": 2}),
    "fsdp+tp-2x2": (4, 4, {"train.parallel": "fsdp+tp", "train.tp": 2}),
    "hsdp-2x2": (4, 2, {"train.parallel": "hsdp", "train.dp_shard": 2}),
}


def run_layout(out: Path, name: str, steps: int) -> dict:
    procs, batch, extra = LAYOUTS[name]
    flags = {
        "model.name": "llama",
        "model.overrides": LLAMA,
        "data.dataset": str(DATA),
        "data.block_size": 64,
        "train.batch_size": batch,
        "train.max_steps": steps,
        "train.eval_every": 25,
        "train.eval_batches": 2,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.deterministic": True,
        "train.threads": 1,
        "train.device": "cpu",
        "train.progress": False,
        "train.tensorboard": False,
        "train.sample_tokens": 0,
        "train.out": str(out),
        "train.name": name,
        "optim.lr": 0.001,
        "optim.warmup_steps": 5,
    } | extra
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        [*launcher, *PRETRAIN, *(f"--{k}={v}" for k, v in flags.items())], capture_output=True, text=True, cwd=ROOT
    )
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((out / name / "summary.json").read_text())
    train = [r for r in records if r["split"] == "train"]
    return {
        "processes": procs,
        "seconds": round(time.perf_counter() - started, 1),
        "losses": [(r["step"], r["split"], r["loss"]) for r in records],
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in train[5:]) / max(len(train[5:]), 1), 1),
        "state_bytes_per_rank": summary["state_bytes_per_rank"],
    }


def losses_and_memory(out: Path, steps: int) -> dict:
    runs = {name: run_layout(out, name, steps) for name in LAYOUTS}
    oracle = runs["single"]["losses"]
    result: dict = {"steps": steps, "layouts": {}}
    for name, run in runs.items():
        assert [x[:2] for x in run["losses"]] == [x[:2] for x in oracle], name
        worst = max(abs(a[2] - b[2]) for a, b in zip(oracle, run["losses"], strict=True))
        result["layouts"][name] = {
            "processes": run["processes"],
            "max_abs_loss_difference": worst,
            "tokens_per_s": run["tokens_per_s"],
            "seconds": run["seconds"],
            "state_bytes_per_rank": run["state_bytes_per_rank"],
        }
        print(f"{name:<14} {run['processes']} proc  max |dloss| {worst:.2e}  {run['tokens_per_s']:>8.0f} tok/s")
    ddp, fsdp = (sum(runs[n]["state_bytes_per_rank"].values()) for n in ("ddp", "fsdp"))
    result["fsdp_over_ddp_state_bytes"] = fsdp / ddp
    print(f"parameters + gradients + AdamW state per rank: FSDP {fsdp:,} B = {fsdp / ddp:.3f}x DDP's {ddp:,} B")
    result["planner_state_bytes"] = planner_state(runs, out, steps)
    return result


def planner_state(runs: dict, out: Path, steps: int) -> dict:
    from lmforge.hf.files import read_config
    from lmforge.hf.load import lmforge_config
    from lmforge.train.parallel import parallel_mode
    from lmforge.train.plan import plan_memory

    step = out / "single" / "checkpoints" / f"step_{steps:08d}"
    config = lmforge_config(read_config(step), step)  # the model the runs trained (its vocabulary included)
    rows = {}
    for name, mode, world, tp, shard in (
        ("ddp", "ddp", 2, 1, 0), ("fsdp", "fsdp", 2, 1, 0), ("tp", "tp", 2, 2, 0), ("hsdp-2x2", "hsdp", 4, 1, 2)
    ):  # fmt: skip
        planned = plan_memory(config, parallel_mode(mode), world, tp, batch=4, seq_len=64, dp_shard=shard)
        measured = runs[name]["state_bytes_per_rank"]
        plan = {"params": planned.params, "grads": planned.grads, "optimizer": planned.optimizer}
        rows[name] = {"planned": plan, "measured": measured, "equal": plan == measured}
        print(f"plan vs measured state bytes, {name:<9} {sum(plan.values()):>10,} vs {sum(measured.values()):>10,}")
    return rows


MEASURE = """
import json, os, sys, torch, psutil
from lmforge.models import build_model
torch.set_num_threads(1)
family, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = build_model(family, vocab_size=65, n_layer=4, n_head=4, d_model=256, dropout=0.0, max_seq_len=seq).train()
ids = torch.randint(0, 65, (batch, seq))
proc = psutil.Process()
model(input_ids=ids[:1, :8], labels=ids[:1, :8]).loss.backward()  # warm-up: kernels and thread pools ready
model.zero_grad(set_to_none=True)
before = proc.memory_info().rss
loss = model(input_ids=ids, labels=ids).loss
after = proc.memory_info().rss
print(json.dumps({"bytes": after - before}))
"""


def activations() -> dict:
    from lmforge.models import build_config
    from lmforge.train.plan import traced_activations

    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    result = {}
    for family in ("gpt", "llama"):
        batch, seq = 8, 512
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, family, str(batch), str(seq)], capture_output=True, text=True, env=env
        )
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])["bytes"]
        config = build_config(family, vocab_size=65, n_layer=4, n_head=4, d_model=256, dropout=0.0, max_seq_len=seq)
        planned = traced_activations(config, batch, seq, "float32")[0]
        result[family] = {"planned": planned, "measured_rss": measured, "ratio": planned / measured}
        print(f"activations {family}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
              f"({planned / measured:.3f}x)")  # fmt: skip
    return result


def titan() -> dict:
    """torchtitan (Liang et al. 2024, and its docs/performance.md): Llama-3-8B, 64 A100-80GB, FSDP, bf16,
    seq 8192, local batch 1, activation checkpointing: about 2,900 tok/s per GPU, 57-58% MFU."""
    from lmforge.models import build_config
    from lmforge.train.parallel import parallel_mode
    from lmforge.train.plan import plan_memory, plan_throughput

    config = build_config(
        "llama", vocab_size=128256, n_layer=32, n_head=32, n_kv_heads=8, d_model=4096, d_ff=14336, max_seq_len=8192
    )
    memory = plan_memory(config, parallel_mode("fsdp"), 64, 1, batch=1, seq_len=8192, dtype="bfloat16")
    speed = plan_throughput(config, 8192, 312e12, 0.575)
    gib = 2**30
    result = {
        "torchtitan_tokens_per_s_per_gpu": 2900,
        "torchtitan_mfu": [0.57, 0.58],
        "plan_tokens_per_s_per_gpu_at_57.5%": speed["tokens_per_s_per_device"],
        "plan_gib_per_rank": memory.total(False) / gib,
        "plan_gib_per_rank_checkpointed": memory.total(True) / gib,
        "plan_state_gib_per_rank": (memory.params + memory.grads + memory.optimizer) / gib,
    }
    print(
        f"Llama-3-8B, 64 x A100 80 GB, FSDP, seq 8192: plan {result['plan_state_gib_per_rank']:.2f} GiB state + "
        f"activations = {result['plan_gib_per_rank']:.1f} GiB per rank ({result['plan_gib_per_rank_checkpointed']:.1f}"
        f" GiB with checkpointing); {speed['tokens_per_s_per_device']:,.0f} tok/s per GPU at 57.5% MFU vs "
        f"torchtitan's ~2,900 at 57-58%"
    )
    return result


def main() -> None:
    from lmforge.io import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", default="losses,activations,titan")
    parser.add_argument("--out", default="runs/bench-parallel")
    args = parser.parse_args()
    parts = args.only.split(",")
    result: dict = {}
    if "losses" in parts:
        result["losses_and_memory"] = losses_and_memory(Path(args.out).resolve(), args.steps)
    if "activations" in parts:
        result["activations"] = activations()
    if "titan" in parts:
        result["torchtitan"] = titan()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "parallel.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    write_json_atomic(path, saved | result, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
