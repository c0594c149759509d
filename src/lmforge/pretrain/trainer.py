"""The pretraining recipe: `pretrain(config)` builds tokenizer, data, model and optimizer, then runs one loop.

The loop itself (gradient accumulation normalised over the whole accumulated batch, clipping, NaN handling,
evaluation, checkpoints, signals) is `lmforge.train.loop.train_loop`, shared with fine-tuning; this module
builds what pretraining feeds it. What differs between objectives (tokenizer, batches, targets, head,
samples) is the objective object of the model's family (`lmforge.pretrain.objectives`). Process r takes rows
[r B, (r + 1) B) of each global micro-batch, so N processes with batch B follow the trajectory of one process
with batch N B.

Evaluation: mean loss over `eval_batches` fixed validation batches, perplexity exp(loss) and bits per byte
= loss / ln 2 * tokens / bytes of the validation text. Checkpoints carry the loader position and RNG states, so
a resumed run sees the same batches and dropout masks as an uninterrupted one (bit-identical on CPU in
deterministic mode).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge.eval import plot_training_curves, write_report
from lmforge.models import count_parameters, family_of, flops_per_token
from lmforge.pretrain.config import PRETRAIN, RunConfig
from lmforge.pretrain.data import TrainData
from lmforge.pretrain.objectives import PretrainObjective, objective_for
from lmforge.train.activations import enable_activation_checkpointing
from lmforge.train.config import config_from_dict, differing_fields
from lmforge.train.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed, seed_everything
from lmforge.train.loop import autocast, open_run, resume_state, say, take_rows, train_loop
from lmforge.train.memory import check_activation_memory
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.parallel import parallel_mode, state_bytes
from lmforge.train.runlock import run_lock

MIN_FREE_BYTES = 64 << 20


def saved_weights(name: str) -> Path | None:
    """The folder or file of a model to continue pretraining (a saved model, checkpoint, run folder, GGUF file
    or real model name, through the one resolver every command uses); None for a preset or family name,
    which starts from random weights."""
    from lmforge.hf.resolve import resolve_model
    from lmforge.models import FAMILIES

    return None if name in FAMILIES else resolve_model(name).path


def build_pretrain_model(config: RunConfig, objective: PretrainObjective, tokenizer) -> nn.Module:
    """A fresh model of `config.model` with the objective's head, sized for the tokenizer, or a saved model
    to continue pretraining."""
    from lmforge.models import build_model

    overrides = dict(config.model.overrides)
    weights = saved_weights(config.model.name)
    if weights is not None:
        from lmforge.hf.load import load_model

        return load_model(weights, dropout=config.model.dropout, **overrides).train()
    values = {"vocab_size": tokenizer.vocab_size, "dropout": config.model.dropout}
    values.update(objective.model_values(config, tokenizer))
    values.update(overrides)
    return build_model(config.model.name, **values).train()


@torch.no_grad()
def evaluate(model, data: TrainData, config: RunConfig, info: DistInfo) -> dict[str, float]:
    """Mean validation loss over the fixed validation batches, perplexity and bits per byte."""
    model.eval()
    objective = data.objective
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (summed loss, target tokens)
    for batch in data.val_batches(config.train.eval_batches):
        batch = take_rows(batch, info, info.device)
        with autocast(config.train.dtype, info.device):
            loss = objective.loss_sum(model, batch)
        total += torch.stack([loss.double(), objective.count(batch).double()])
    model.train()
    total = all_reduce_sum(total, info)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) * data.val_tokens_per_byte,
    }


def pretrain(config: RunConfig, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Train `config.model` on `config.data` for `config.train.max_steps` steps; returns the run summary.
    `on_eval(step, metrics)` sees every validation (`train_loop`'s hook, e.g. a tuner's pruning)."""
    tc = config.train
    info = init_distributed(tc.device)
    try:
        with run_lock(config.run_dir, enabled=info.is_main):
            return _pretrain(config, info, on_eval)
    finally:
        cleanup(info)


def _pretrain(config: RunConfig, info: DistInfo, on_eval: Callable[[int, dict[str, float]], None] | None) -> dict:
    tc, device = config.train, info.device
    run_dir = config.run_dir
    mode = parallel_mode(tc.parallel)
    info = mode.place(info, tc)
    latest = open_run(tc, run_dir, info, MIN_FREE_BYTES)
    if latest is not None:
        check_resumable(latest, config)
    seed_everything(tc.seed, tc.deterministic)

    weights = saved_weights(config.model.name)
    objective = objective_for(family_of(str(weights) if weights is not None else config.model.name))
    data = objective.prepare(config, run_dir, info, reuse_tokenizer=latest is not None)
    raw_model = build_pretrain_model(config, objective, data.tokenizer).to(device)
    mode.check(raw_model.config, tc, info.world_size)
    check_activation_memory(
        raw_model,
        tc.batch_size,
        config.data.block_size,
        tc.dtype,
        tc.activation_checkpointing,
        device,
        f"data.block_size={config.data.block_size} x train.batch_size={tc.batch_size}",
    )
    if tc.activation_checkpointing:
        enable_activation_checkpointing(raw_model)
    raw_model = mode.shard(raw_model, info, tc)  # before the optimizer: it must hold the sharded parameters
    optimizer = build_optimizer(raw_model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, tc.max_steps)
    scaler = torch.amp.GradScaler("cuda") if tc.dtype == "float16" else None

    train_batches = data.train_loader(tc.batch_size * info.dp_size)
    private = None
    if config.privacy.epsilon is not None:  # DP-SGD: Poisson batches of fixed windows, clipped and noised
        from lmforge.train.batches import Endless
        from lmforge.train.privacy import make_private

        examples, collate = objective.private_examples(data)
        private, config, message = make_private(config, info, raw_model, optimizer, examples, collate)
        optimizer, train_batches, tc = private.optimizer, Endless(private.loader), config.train
        say(info, message)
    state = resume_state(latest, raw_model, optimizer, scheduler, train_batches, scaler, info)

    model = mode.wrap(raw_model, info) if private is None else private.training_model
    if tc.compile:
        model = torch.compile(model)

    # a Poisson batch's size varies: its tokens are counted per step
    tokens_per_step = objective.tokens_per_step(config, info.dp_size) if private is None else None
    peak = None
    if tc.progress and info.is_main:
        from lmforge.nn.precision import bf16_product_dtype
        from lmforge.train.logging import measure_peak_flops

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep the run's RNG
            products = bf16_product_dtype(device) if tc.dtype == "bfloat16" else torch.float32
            peak = measure_peak_flops(products, device=device)
    per_step = f"{tokens_per_step:,}" if tokens_per_step else "padded"
    if private is not None:
        per_step = f"~{tc.batch_size * info.dp_size * config.data.block_size:,} (Poisson-sampled windows)"
    say(
        info,
        f"pretraining {config.model.name} ({count_parameters(raw_model) / 1e6:.2f}M parameters, {objective.name}) on "
        f"{config.data.dataset}: {data.n_train_tokens:,} train tokens, vocab {data.tokenizer.vocab_size}, "
        f"{per_step} tokens/step, {info.world_size} process(es) ({mode.name}) on {device}; run folder {run_dir}",
    )
    result = train_loop(
        config=config,
        info=info,
        model=model,
        raw_model=raw_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_batches=train_batches,
        objective=objective,
        evaluate=lambda: evaluate(model, data, config, info),
        run_dir=run_dir,
        tokenizer=data.tokenizer,
        state=state,
        tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token(raw_model, config.data.block_size),
        peak_flops=peak,
        on_eval=on_eval,
        hook=private,
        sharded=mode.sharded,
    )
    step, stopped_by, last_eval, skipped = result.step, result.stopped_by, result.last_eval, result.skipped
    state = result.state.to_dict()

    summary = {
        "run_dir": str(run_dir),
        "model": config.model.name,
        "dataset": config.data.dataset,
        "parameters": count_parameters(raw_model),
        "objective": objective.name,
        "steps": step,
        "max_steps": tc.max_steps,
        "tokens_seen": state["tokens_seen"],
        "skipped_steps": skipped,
        "stopped_by": stopped_by,
        "best_val_loss": state["best_val_loss"],
        "best_step": state["best_step"],
        "final_val": last_eval,
        "world_size": info.world_size,
        "parallel": mode.name,
        "state_bytes_per_rank": state_bytes(raw_model, optimizer),
        "device": str(device),
    }
    if private is not None:
        summary["privacy"] = private.summary()
        say(
            info,
            f"DP-SGD: ε={summary['privacy']['epsilon_spent']:.3f} spent of {config.privacy.epsilon:g} "
            f"(δ={config.privacy.delta:g}) over {len(examples):,} windows of {config.data.block_size} tokens",
        )
    if info.is_main:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            plot_training_curves(metrics, run_dir / "loss.png")
            summary["plot"] = str(run_dir / "loss.png")
        if tc.sample_tokens and stopped_by is None and mode.sharded:  # its forward needs every rank
            say(info, f"no samples.txt from a {mode.name} run: `lmforge convert` a checkpoint, then `lmforge generate`")
        elif tc.sample_tokens and stopped_by is None:
            samples = objective.write_samples(raw_model, data, config, run_dir)
            if samples is not None:
                summary["samples"] = samples
        write_report(
            run_dir,
            {k: v for k, v in summary.items() if k != "samples"},
            title=f"Pretraining {config.model.name} on {config.data.dataset}",
            plots={"training curves": summary["plot"]} if "plot" in summary else None,
            json_name="summary.json",
            markdown_name="summary.md",
        )
    return summary


def check_resumable(path: Path, config: RunConfig) -> None:
    """Refuse to resume a checkpoint written by a run with another model or data config, naming the fields."""
    state_file = Path(path) / "trainer_state.json"
    if not state_file.is_file():
        return  # load_checkpoint names what is missing
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    saved_config = (saved.get("state") or {}).get("config")
    if not saved_config:
        return
    diffs = differing_fields(config_from_dict(saved_config, str(state_file), PRETRAIN).to_dict(), config.to_dict())
    if diffs:
        raise ValueError(
            f"cannot resume {path}: the run was saved with another config ({'; '.join(diffs)}); "
            "use the saved settings or start a new run with another train.name"
        )
