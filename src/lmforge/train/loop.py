"""The training loop every recipe shares: pretraining (`lmforge.pretrain`) and fine-tuning (`lmforge.finetune`).

A recipe builds the model, optimizer, scheduler and an infinite, resumable batch iterator, then hands them to
`train_loop` with an `Objective` (what one batch's loss is) and an evaluation function. The loop owns what
must behave the same in every recipe: gradient accumulation normalised over the whole accumulated batch,
clipping, NaN handling, the progress bar and metrics, evaluation with best tracking and early stopping,
atomic checkpoints with loader and RNG state, and SIGINT/SIGTERM saves.

One optimizer step (every process runs it; process 0 logs and saves):

    micro  = grad_accum micro-batches; this process takes its rows of each global batch
    n      = objective.count(m) summed over the micro-batches and processes (all-reduce)
    for each micro-batch m:  (objective.loss_sum(m) * world_size / n).backward()
    clip the gradient norm, optimizer step, scheduler step

Dividing every micro-batch's *summed* loss by the same n makes the gradient exactly that of the mean loss over
the concatenated batch, however the counted units (tokens, examples) fall across micro-batches; dividing each
micro-batch's mean by grad_accum instead over-weights units of small micro-batches. DDP averages gradients
over processes, hence the factor world_size. The loss's own parameters (`Objective.loss_module`) are outside
DDP's wrapper: the loop averages their gradients over processes itself, clips them with the model's and saves
them in every checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

from lmforge import interrupts
from lmforge.hf.runs import latest_checkpoint
from lmforge.nn.precision import bf16_autocast, cpu_has_native_bf16
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, all_reduce_sum, barrier, gradient_sync_paused
from lmforge.train.logging import MetricsLogger, TrainProgress
from lmforge.train.memory import retained_heap
from lmforge.train.objective import Objective
from lmforge.train.optim import add_l1_subgradient
from lmforge.train.parallel import clip_grad_norm

INTERRUPTS = ("SIGINT", "SIGTERM")  # the `stopped_by` of a run a signal stopped (a caller running several should stop)


class Stop:
    """Set by SIGINT/SIGTERM; the loop checks it after each step, saves a checkpoint and returns. The signal
    ends only this loop: a caller that runs several (K-fold, a tuning study) checks `stopped_by in INTERRUPTS`
    and stops too, or Ctrl-C would only skip to the next fold or trial."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        self.signal = interrupts.pending  # a Ctrl-C during start-up that something swallowed: stop at once
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def say(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for `train.dtype`, nothing for float32; bf16 on a CPU without bf16 products computes
    its products in fp32 on the bf16-rounded operands (`lmforge.nn.precision`: the same numbers, 10-20x faster
    than PyTorch's emulation)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bfloat16":
        return bf16_autocast(device)
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def backward_accumulated(
    model: nn.Module,
    micro: list[dict],
    objective: Objective,
    dtype: str,
    info: DistInfo,
    scaler=None,
    per_process_mean: bool = False,
) -> float:
    """Backward of one optimizer step's micro-batches, normalised by the units of all of them (over every
    process); returns the step's mean loss per unit. The gradient equals that of the mean loss over the
    concatenated batch, whatever the split into micro-batches and processes. With `per_process_mean` (DP-SGD,
    whose per-example gradients undo each process's own mean) each process divides by its own units instead."""
    counts = torch.stack([objective.count(batch) for batch in micro]).double()
    n_units = max(all_reduce_sum(counts.sum(), info).item(), 1.0)
    # n_units counts a tensor-parallel group's shared rows once per member: world / n_units = dp_size / rows
    scale = 1 / max(counts.sum().item(), 1.0) if per_process_mean else info.world_size / n_units
    step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or info.world_size == 1 else gradient_sync_paused(model)
        with sync:
            with autocast(dtype, info.device):
                loss_sum = objective.loss_sum(model, batch)
            scaled = loss_sum * scale  # DDP averages over processes: world / n undoes the 1/world
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss_sum.detach().double()
    return all_reduce_sum(step_loss, info).item() / n_units


def take_rows(
    batch: dict[str, torch.Tensor], info: DistInfo, device: torch.device, split: bool = True
) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch (all of it with `split=False`: a per-process batch), on `device`.
    Processes of one tensor-parallel group share a data-parallel rank, hence the same rows."""
    if info.dp_size == 1 or not split:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    rows = batch["input_ids"].shape[0] // info.dp_size
    part = slice(info.dp_rank * rows, (info.dp_rank + 1) * rows)
    return {k: v[part].to(device, non_blocking=True) for k, v in batch.items()}


def average_loss_gradients(loss_module: nn.Module | None, info: DistInfo) -> None:
    """Average the gradients of the loss's own parameters over processes, as DDP does for the model's: each
    process holds its rows' gradient times world_size / n (see `backward_accumulated`)."""
    if loss_module is None or info.world_size == 1:
        return
    for p in loss_module.parameters():
        if p.grad is not None:
            all_reduce_sum(p.grad, info).div_(info.world_size)


def optimizer_step(
    raw_model: nn.Module,
    optimizer,
    scheduler,
    scaler,
    grad_clip: float,
    l1: float = 0.0,
    loss_module: nn.Module | None = None,
) -> tuple[float, float]:
    """Add the L1 subgradient (`l1` > 0), clip, step and zero the gradients, advance the schedule; returns
    (gradient norm before clipping, the lr the step used). The norm covers the model's trainable parameters and
    `loss_module`'s. With fp16 the GradScaler unscales first (so the penalty and the clip see true gradients) and
    skips the step when they overflowed."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    add_l1_subgradient(optimizer, l1)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    if loss_module is not None:
        trainable += [p for p in loss_module.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm(trainable, grad_clip) if grad_clip > 0 else float("nan")
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, lr


@dataclass
class LoopState:
    """What the loop carries across steps and checkpoints (besides model, optimizer and loader)."""

    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "tokens_seen": self.tokens_seen,
        }

    def update(self, saved: dict[str, Any]) -> None:
        for key in self.to_dict():
            if key in saved:
                setattr(self, key, saved[key])


EMULATED_BF16 = (
    "note: this CPU has no bf16 matrix products (no AVX512-BF16 or AMX); train.dtype=bfloat16 computes them in "
    "fp32 on the bf16-rounded operands (bf16 hardware's numbers at ~0.8x float32's speed; PyTorch's emulation "
    "runs ~20x slower than float32): --train.dtype=float32 is faster on this machine and more precise"
)
"""Said once at the start of a run. bf16 autocast pays where the hardware multiplies bf16 (CUDA, AVX512-BF16, AMX:
2-4x the fp32 GEMM rate); on AVX2 CPUs PyTorch would widen and round every product in software, ~20x slower than
fp32, and `lmforge.nn.precision` computes them as fp32 products instead."""

EMULATED_BF16_COMPILED = (
    "warning: train.dtype=bfloat16 with train.compile on a CPU without bf16 matrix products (no AVX512-BF16 or "
    "AMX): the compiled model runs PyTorch's emulated bf16 products, ~10x slower than float32; drop "
    "--train.compile or pass --train.dtype=float32 on this machine"
)
"""A compiled model keeps autocast's bf16 products (`lmforge.nn.precision.WidenedBf16` does not reach into
dynamo's graphs)."""


def open_run(tc: Any, run_dir: Path, info: DistInfo, min_free_bytes: int) -> Path | None:
    """Check the run's settings and folder before anything is built; returns the checkpoint to resume from
    (None for a fresh run). A run folder that holds checkpoints is only continued with train.resume."""
    if tc.dtype == "float16" and info.device.type != "cuda":
        raise ValueError("train.dtype=float16 needs a CUDA device (GradScaler); on CPU use train.dtype=bfloat16")
    if tc.dtype == "bfloat16" and info.device.type == "cpu" and not cpu_has_native_bf16():
        say(info, EMULATED_BF16_COMPILED if getattr(tc, "compile", False) else EMULATED_BF16)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if info.is_main:
        ckpt.check_writable(run_dir, min_free_bytes)
    latest = latest_checkpoint(run_dir)
    if latest is not None and not tc.resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest: {latest.name}); pass --resume to continue that run, "
            "or --train.name / --out for a new one"
        )
    if tc.resume and latest is None:
        say(info, f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    return latest


def resume_state(
    latest: Path | None,
    raw_model: nn.Module,
    optimizer,
    scheduler,
    train_batches,
    scaler,
    info: DistInfo,
    loss_module: nn.Module | None = None,
) -> LoopState:
    """The loop state of a fresh run, or the one saved in `latest` with model, optimizer, scheduler, loader,
    GradScaler and the loss's own weights (`loss_module`) restored in place."""
    state = LoopState()
    if latest is None:
        return state
    saved = ckpt.load_checkpoint(latest, raw_model, optimizer, scheduler, loss_module=loss_module)
    state.step = int(saved["step"])
    train_batches.load_state_dict(saved["loader"])
    state.update(saved)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    say(info, f"resumed from {latest} at step {state.step}")
    return state


def per_process(batches) -> bool:
    """Whether a loader (or `Endless` around one) gives each process its own batch rather than a global one."""
    return bool(getattr(getattr(batches, "loader", batches), "per_process", False))


class StepHook:
    """What a recipe may add to every step without the loop knowing what it is (DP-SGD's privacy accounting,
    `lmforge.train.privacy`): `before_step(step)` returns a reason to stop before taking step `step + 1` (the loop
    saves and ends the run, stopped_by="budget"), and `metrics()` extra numbers for metrics.jsonl and the bar.
    `per_process_mean = True` makes each process's loss the mean over its own units (see `backward_accumulated`)."""

    per_process_mean = False

    def before_step(self, step: int) -> str | None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class LoopResult:
    step: int
    stopped_by: str | None
    last_eval: dict[str, float] | None
    skipped: int
    state: LoopState


def train_loop(
    *,
    config: Any,
    info: DistInfo,
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    train_batches: Iterator[dict],
    objective: Objective,
    evaluate: Callable[[], dict[str, float]],
    run_dir: Path,
    tokenizer: Any,
    state: LoopState,
    tokens_per_step: int | None,
    flops_per_token: int,
    peak_flops: float | None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    hook: StepHook | None = None,
    sharded: bool = False,
) -> LoopResult:
    """Run optimizer steps from `state.step` to `config.train.max_steps`; see the module docstring.
    `config` has `.train` (TrainSection), `.optim.grad_clip` and `to_dict()`; `evaluate()` returns metrics
    with a "loss" (lower is better: best checkpoint and early stopping follow it). `on_eval(step, metrics)`, if
    given, sees every evaluation as it is logged; an exception it raises (a tuner's pruning) ends the run.
    `hook` (a `StepHook`) may stop the run before a step and adds its metrics to the logs and the bar.
    `sharded` (FSDP/TP models): every rank writes its shards of each checkpoint (`lmforge.train.sharded`)."""
    tc = config.train
    step = state.step
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard, enabled=info.is_main)
    progress = TrainProgress(tc.max_steps, start_step=step, enabled=tc.progress and info.is_main)

    def save(step: int, is_best: bool = False) -> Path | None:
        path = None
        if info.is_main or sharded:  # a sharded save is collective: every rank writes its shards
            trainer_state = {
                **state.to_dict(),
                "step": step,
                "loader": train_batches.state_dict(),
                "config": config.to_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            path = ckpt.save_checkpoint(
                run_dir,
                step,
                raw_model,
                optimizer,
                scheduler,
                trainer_state,
                tokenizer=tokenizer,
                keep_last=tc.keep_last,
                is_best=is_best,
                loss_module=objective.loss_module,
                sharded=sharded,
                info=info,
            )
        barrier(info)
        return path

    stopped_by, last_eval, skipped = None, None, 0
    window_start, window_tokens = time.perf_counter(), 0
    device = info.device
    split = not per_process(train_batches)  # DP-SGD's Poisson batches are each process's own already
    per_process_mean = bool(getattr(hook, "per_process_mean", False))
    with Stop() as stop, retained_heap(device, tc.reuse_freed_memory):
        while step < tc.max_steps:
            if hook is not None and (reason := hook.before_step(step)):
                stopped_by = "budget"
                say(info, f"stopping at step {step}: {reason}")
                save(step)
                break
            # ---- one optimizer step over grad_accum micro-batches
            micro = [take_rows(next(train_batches), info, device, split) for _ in range(tc.grad_accum)]
            loss = backward_accumulated(model, micro, objective, tc.dtype, info, scaler, per_process_mean)
            average_loss_gradients(objective.loss_module, info)
            step_tokens = tokens_per_step if tokens_per_step is not None else objective.tokens(micro) * info.dp_size

            if not math.isfinite(loss):
                if tc.nan_policy == "stop":
                    last = latest_checkpoint(run_dir)
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
                    raise RuntimeError(
                        f"the training loss became {loss} at step {step + 1}; {kept}. Lower optim.lr, raise "
                        "optim.warmup_steps or use train.dtype=float32, then resume; train.nan_policy=skip skips "
                        "such steps"
                    )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step, skipped = step + 1, skipped + 1
                say(info, f"step {step}: loss {loss}, step skipped (train.nan_policy=skip)")
                continue

            grad_norm, lr = optimizer_step(
                raw_model, optimizer, scheduler, scaler, config.optim.grad_clip, config.optim.l1, objective.loss_module
            )
            step += 1
            state.tokens_seen += step_tokens
            window_tokens += step_tokens

            # ---- logging, evaluation, checkpoints
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            step_mfu = None if peak_flops is None else tokens_per_s * flops_per_token / peak_flops
            if step_mfu is not None and step_mfu > 1.0:  # the peak was measured under load: not trustworthy
                step_mfu = None
            logging_step = step % tc.log_every == 0 or step == tc.max_steps
            extra = hook.metrics() if hook is not None and (logging_step or progress.live) else {}
            progress.update(step, loss, lr, tokens_per_s, step_mfu, extra)
            if logging_step:
                values = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "grad_norm": grad_norm} | extra
                logger.log(step, values | ({"mfu": step_mfu} if step_mfu is not None else {}))
                window_start, window_tokens = time.perf_counter(), 0
            is_best, early_stop = False, False
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                last_eval = evaluate()
                logger.log(step, last_eval, split="val")
                if on_eval is not None:
                    try:
                        on_eval(step, last_eval)
                    except BaseException:  # the caller ends the run (a pruned trial): release the bar and logs
                        progress.close()
                        logger.close()
                        raise
                if state.best_val_loss is None or last_eval["loss"] < state.best_val_loss:
                    state.best_val_loss, state.best_step, state.evals_without_improvement = last_eval["loss"], step, 0
                    is_best = True
                else:
                    state.evals_without_improvement += 1
                    patience = tc.early_stopping_patience
                    early_stop = bool(patience) and state.evals_without_improvement >= patience
            signalled = stop.signal is not None
            if info.world_size > 1:  # a signal may reach the processes at different steps: stop together
                signalled = all_reduce_sum(torch.tensor(float(signalled), device=device), info).item() > 0
            periodic = tc.save_every and step % tc.save_every == 0
            if periodic or is_best or early_stop or step == tc.max_steps or signalled:
                save(step, is_best=is_best)
            if early_stop:
                stopped_by = "early_stopping"
                say(info, f"early stopping at step {step}: no better val loss in {tc.early_stopping_patience} evals")
                break
            if signalled:
                stopped_by = signal.Signals(stop.signal).name if stop.signal is not None else "signal"
                say(info, f"{stopped_by} at step {step}: checkpoint saved; continue with --resume")
                break
    progress.close()
    logger.close()
    state.step = step
    return LoopResult(step=step, stopped_by=stopped_by, last_eval=last_eval, skipped=skipped, state=state)
