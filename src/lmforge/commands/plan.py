"""`lmforge plan`: memory per rank (and an assumed-MFU throughput) of a run on accelerators we may not have."""

from __future__ import annotations

import argparse
import json

from lmforge.commands.common import parse_overrides

GIB = 2**30


def cmd_plan(args: argparse.Namespace) -> int:
    from lmforge.models import build_config
    from lmforge.models.build import human_bytes
    from lmforge.train.config import TrainSection
    from lmforge.train.parallel import parallel_mode
    from lmforge.train.plan import plan_memory, plan_throughput

    config = build_config(args.model, **parse_overrides(args.set))
    mode = parallel_mode(args.parallel)
    tc = TrainSection(tp=args.tp, dtype=args.dtype, parallel=args.parallel, dp_shard=args.dp_shard)
    mode.check(config, tc, args.gpus)
    fsdp, tp = mode.degrees(args.gpus, args.tp, args.dp_shard)
    memory = plan_memory(config, mode, args.gpus, args.tp, args.batch, args.seq_len, args.dtype, args.dp_shard)
    speed = plan_throughput(config, args.seq_len, args.peak_tflops * 1e12, args.mfu)
    budget = int(args.gpu_mem * GIB)
    fits = {ckpt: memory.total(ckpt) <= budget for ckpt in (False, True)}
    result = {
        "model": args.model,
        "parameters_per_rank": memory.params // 4,
        "layout": {"gpus": args.gpus, "parallel": mode.name, "fsdp": fsdp, "tp": tp, "data_parallel": args.gpus // tp},
        "bytes_per_rank": {
            "params": memory.params,
            "grads": memory.grads,
            "optimizer": memory.optimizer,
            "activations": memory.activations,
            "activations_checkpointed": memory.activations_checkpointed,
            "total": memory.total(False),
            "total_checkpointed": memory.total(True),
        },
        "fits": {"without_checkpointing": fits[False], "with_checkpointing": fits[True]},
        "tokens_per_step": args.batch * args.seq_len * (args.gpus // tp),
        **speed,
        "assumed_mfu": args.mfu,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on {args.gpus} x {args.gpu_mem:g} GiB, {mode.name} (fsdp {fsdp}, tp {tp}), per rank:")
        for name in ("params", "grads", "optimizer", "activations", "activations_checkpointed"):
            print(f"  {name:<25} {human_bytes(result['bytes_per_rank'][name]):>12}")
        totals = (("total", "total", fits[False]), ("with checkpointing", "total_checkpointed", fits[True]))
        for label, key, ok in totals:
            verdict = "fits" if ok else f"does not fit in {args.gpu_mem:g} GiB"
            print(f"  {label:<25} {human_bytes(result['bytes_per_rank'][key]):>12}  {verdict}")
        print(
            f"  {speed['flops_per_token'] / 1e9:.2f} GFLOPs/token: {speed['tokens_per_s_per_device']:,.0f} tokens/s "
            f"per device at an assumed {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s"
        )
    return 0 if fits[False] or fits[True] else 1


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser(
        "plan", help="memory per rank (params, grads, optimizer, activations) of a run under ddp/fsdp/hsdp/tp/fsdp+tp"
    )
    p.add_argument("--model", required=True, help="preset (e.g. llama-135m) or family")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--gpus", type=int, required=True, help="processes (accelerators) in the run")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per accelerator, GiB")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch", type=int, required=True, help="sequences per micro-batch per data-parallel rank")
    p.add_argument("--parallel", default="fsdp", help="ddp | fsdp | hsdp | tp | fsdp+tp (default: fsdp)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (tp, fsdp+tp)")
    p.add_argument(
        "--dp-shard", type=int, default=0, help="hsdp: ranks per shard group, e.g. GPUs per node (0: all of them)"
    )
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="activation precision")
    p.add_argument("--peak-tflops", type=float, default=312.0, help="peak TFLOP/s per device (A100 bf16: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the speed line")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
