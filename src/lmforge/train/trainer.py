"""The pretraining recipe: `pretrain(config)` builds tokenizer, data, model and optimizer, then runs one loop.

The loop, one optimizer step at a time (every process runs it; process 0 logs and saves):

    batches = grad_accum micro-batches of batch_size x world_size windows; this process takes its rows
    n      = number of target tokens in all of them, summed over processes (all-reduce)
    for each micro-batch m:  (sum over its targets of -log p(target) * world_size / n).backward()
    clip the gradient norm, optimizer step, scheduler step

Gradient accumulation is normalised by the token count of the whole accumulated batch: each micro-batch's
summed loss is divided by the same n, so the gradient is exactly that of the concatenated batch, however the
target tokens fall across micro-batches (dividing each micro-batch's *mean* by grad_accum weights tokens of
short micro-batches more, a bug several trainers shipped). DDP averages gradients over processes, hence the
factor world_size. Process r takes rows [r B, (r + 1) B) of each global micro-batch, so N processes with
batch B follow the trajectory of one process with batch N B.

Objectives by family: causal LM (gpt, llama) on random windows (`RandomWindows`); masked LM (bert, roberta)
on packed blocks (`MLMBatches`); span corruption (t5) on packed blocks (`SpanCorruptionBatches`), the decoder
fed the targets shifted right (teacher forcing); translation (transformer) on padded (source, target) pairs
(`Seq2SeqBatches`), the same teacher forcing from the bos token, with greedy translations of held-out sources as
samples. For every objective but causal LM the loss, perplexity and bits per byte count the predicted tokens
only.

Evaluation: mean loss over `eval_batches` fixed validation batches, perplexity exp(loss) and bits per byte
= loss / ln 2 * tokens / bytes of the validation text. Checkpoints carry the loader position and RNG states, so
a resumed run sees the same batches and dropout masks as an uninterrupted one (bit-identical on CPU in
deterministic mode).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.loaders import IGNORE_INDEX
from lmforge.data.tokenizer import write_atomic
from lmforge.nn import Block
from lmforge.nn.loss import cross_entropy
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import RunConfig, config_from_dict, differing_fields
from lmforge.train.data import TrainData, prepare_data
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    seed_everything,
    wrap_model,
)
from lmforge.train.logging import MetricsLogger, TrainProgress, plot_curves, write_summary
from lmforge.train.optim import build_optimizer, build_scheduler

OBJECTIVES = {
    "gpt": "causal_lm",
    "llama": "causal_lm",
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "t5": "span_corruption",
    "transformer": "translation",
}
HEADS = {
    "causal_lm": "causal_lm",
    "masked_lm": "masked_lm",
    "span_corruption": "seq2seq_lm",
    "translation": "seq2seq_lm",
}
MIN_FREE_BYTES = 64 << 20


class Stop:
    """Set by SIGINT/SIGTERM; the loop checks it after each step, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------ building


def model_family(name: str) -> str:
    """The family of a preset, a family name or a saved model folder."""
    from lmforge.models import PRESETS

    if name in PRESETS:
        return PRESETS[name][0]
    folder = Path(name)
    if (folder / "config.json").is_file():
        import json

        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return values.get("family") or {"gpt2": "gpt"}.get(values.get("model_type"), values.get("model_type", ""))
    return name


def build_model(config: RunConfig, vocab_size: int, token_ids: dict[str, int] | None = None) -> nn.Module:
    """A fresh model of `config.model` sized for the tokenizer, or a saved model to continue pretraining.
    `token_ids` (pad/bos/eos_token_id) are the tokenizer's special ids the model config must carry."""
    from lmforge.models import build_model as build

    name, overrides = config.model.name, dict(config.model.overrides)
    if Path(name).exists():
        from lmforge.hf.load import load_model

        model = load_model(name, dropout=config.model.dropout, **overrides)
        return model.train()
    family = model_family(name)
    if family not in OBJECTIVES:
        known = ", ".join(sorted(OBJECTIVES))
        raise ValueError(f"model.name={name!r}: pretraining {family!r} models is not supported yet; use one of {known}")
    objective = OBJECTIVES[family]
    values = {"head": HEADS[objective], "vocab_size": vocab_size, "dropout": config.model.dropout, **(token_ids or {})}
    if objective != "span_corruption":  # T5's relative positions have no maximum length
        values["max_seq_len"] = config.data.block_size + (2 if objective == "masked_lm" else 0)
    values.update(overrides)
    return build(name, **values).train()


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each Transformer block's activations in the backward pass instead of keeping them:
    memory O(layers) hidden states instead of O(layers x block internals), at one extra block forward.
    Patches the instances' `forward`, so parameter names (and checkpoints) stay the same."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def autocast(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.train.dtype == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.train.dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ loss


def targets_of(batch: dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """The (B, T) token ids each position predicts, IGNORE_INDEX where nothing is predicted."""
    labels = batch["labels"]
    if objective == "causal_lm":  # position t predicts labels[t + 1]
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return labels


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Sum over the batch's target tokens of -log p(target): the mean cross-entropy times the token count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _is_seq2seq(model):  # teacher forcing: the decoder reads the targets shifted right after a start token
        config = _bare(model).config
        # T5 starts from its decoder_start_token_id (= pad), the Transformer from bos
        start = getattr(config, "decoder_start_token_id", getattr(config, "bos_token_id", 0))
        shifted = F.pad(batch["labels"][:, :-1], (1, 0), value=start)
        inputs["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE_INDEX, config.pad_token_id)
    logits = model(**inputs).logits  # (B, T, vocab)
    count = (targets != IGNORE_INDEX).sum()
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX) * count


def backward_accumulated(model, micro: list[dict], objective: str, config: RunConfig, info: DistInfo, scaler=None):
    """Backward of one optimizer step's micro-batches, normalised by the target tokens of all of them (over
    every process); returns the step's mean loss per target token. The gradient equals that of the mean loss
    over the concatenated batch, whatever the split into micro-batches and processes."""
    targets = [targets_of(batch, objective) for batch in micro]
    counts = torch.stack([(t != IGNORE_INDEX).sum() for t in targets]).double()
    n_targets = max(all_reduce_sum(counts.sum(), info).item(), 1.0)
    step_loss = torch.zeros((), dtype=torch.float64, device=info.device)
    for i, (batch, target) in enumerate(zip(micro, targets, strict=True)):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or info.world_size == 1 else model.no_sync()
        with sync:
            with autocast(config, info.device):
                loss_sum = summed_loss(model, batch, target)
            scaled = loss_sum * (info.world_size / n_targets)  # DDP averages over processes: undo the 1/world
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        step_loss += loss_sum.detach().double()
    return all_reduce_sum(step_loss, info).item() / n_targets


def pair_tokens(micro: list[dict]) -> int:
    """Source plus target tokens of padded translation batches (padding not counted)."""
    return sum(int(b["attention_mask"].sum()) + int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)


def _bare(model: nn.Module) -> nn.Module:
    from lmforge.train.distributed import unwrap_model

    return unwrap_model(model)


def _is_seq2seq(model: nn.Module) -> bool:
    return getattr(_bare(model).config, "head", "") == "seq2seq_lm"


def take_rows(batch: dict[str, torch.Tensor], info: DistInfo, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch, on `device`."""
    rows = batch["input_ids"].shape[0] // info.world_size
    part = slice(info.rank * rows, (info.rank + 1) * rows)
    return {k: v[part].to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data: TrainData, config: RunConfig, info: DistInfo, objective: str) -> dict[str, float]:
    """Mean validation loss over the fixed validation batches, perplexity and bits per byte."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (summed loss, target tokens)
    for batch in data.val_batches(config.train.eval_batches):
        batch = take_rows(batch, info, info.device)
        targets = targets_of(batch, objective)
        with autocast(config, info.device):
            loss = summed_loss(model, batch, targets)
        total += torch.stack([loss.double(), (targets != IGNORE_INDEX).sum().double()])
    model.train()
    total = all_reduce_sum(total, info)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) * data.val_tokens_per_byte,
    }


# ------------------------------------------------------------------------------------------ samples


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, n_tokens: int, context: int, temperature: float, seed: int) -> str:
    """`n_tokens` tokens after `prompt`, in segments that fit the trained context: each segment starts from the
    last half-context of text so far (positions beyond `context` were never trained)."""
    from lmforge.generate import generate

    ids = tokenizer.encode(prompt, add_special_tokens=False) or [0]
    start = len(ids)
    model.eval()
    while len(ids) - start < n_tokens:
        window = ids[-(context // 2) :]
        steps = min(n_tokens - (len(ids) - start), context - len(window))
        options = {"do_sample": True, "temperature": temperature, "seed": seed} if temperature > 0 else {}
        out = generate(
            model, torch.tensor([window], device=next(model.parameters()).device), max_new_tokens=steps, **options
        )
        ids += out.tokens[0].tolist()
        seed += 1
    model.train()
    return tokenizer.decode(ids)


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], max_len: int) -> list[str]:
    """Greedy translations of `sources` (each cut to `max_len` tokens with its EOS, as in training), of at
    most `max_len` tokens: the decoder's trained positions."""
    from lmforge.generate import generate

    eos = tokenizer.eos_token_id
    rows = [
        row[: max_len - 1] + [eos] for row in tokenizer.encode_batch(sources, add_special_tokens=False)["input_ids"]
    ]
    device = next(model.parameters()).device
    input_ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):  # the encoder is bidirectional: right padding, masked out
        input_ids[r, : len(row)] = torch.tensor(row)
        attention_mask[r, : len(row)] = 1
    model.eval()
    out = generate(model, input_ids, attention_mask, max_new_tokens=max_len)
    model.train()
    return [tokenizer.decode([t for t in row.tolist() if t not in (eos, tokenizer.pad_token_id)]) for row in out.tokens]


def write_translations(model, data: TrainData, config: RunConfig, run_dir: Path) -> str:
    sources = [source for source, _ in data.sample_pairs]
    max_len = min(config.train.sample_tokens, config.data.block_size)
    outputs = translate(model, data.tokenizer, sources, max_len)
    parts = [
        f"=== source ===\n{source}\n=== reference ===\n{reference}\n=== greedy ===\n{output}\n"
        for (source, reference), output in zip(data.sample_pairs, outputs, strict=True)
    ]
    body = "\n".join(parts)
    write_atomic(run_dir / "samples.txt", body)
    return body


def write_samples(model, data: TrainData, config: RunConfig, run_dir: Path) -> str:
    if data.objective == "translation":
        return write_translations(model, data, config, run_dir)
    context = config.data.block_size
    parts = []
    for label, temperature in (("greedy", 0.0), ("temperature 0.8", 0.8)):
        text = sample_text(
            model,
            data.tokenizer,
            config.train.sample_prompt,
            config.train.sample_tokens,
            context,
            temperature,
            config.train.seed,
        )
        parts.append(f"=== {label} ===\n{text}\n")
    body = "\n".join(parts)
    write_atomic(run_dir / "samples.txt", body)
    return body


# ------------------------------------------------------------------------------------------ the recipe


def pretrain(config: RunConfig) -> dict:
    """Train `config.model` on `config.data` for `config.train.max_steps` steps; returns the run summary."""
    tc = config.train
    info = init_distributed(tc.device)
    try:
        return _pretrain(config, info)
    finally:
        cleanup(info)


def _say(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def _pretrain(config: RunConfig, info: DistInfo) -> dict:
    tc, device = config.train, info.device
    if tc.dtype == "float16" and device.type != "cuda":
        raise ValueError("train.dtype=float16 needs a CUDA device (GradScaler); on CPU use train.dtype=bfloat16")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = config.run_dir
    if info.is_main:
        ckpt.check_writable(run_dir, MIN_FREE_BYTES)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not tc.resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest: {latest.name}); pass --resume to continue that run, "
            "or --train.name / --out for a new one"
        )
    if tc.resume and latest is None:
        _say(info, f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    if latest is not None:
        check_resumable(latest, config)
    seed_everything(tc.seed, tc.deterministic)

    objective = OBJECTIVES.get(model_family(config.model.name), "causal_lm")
    data = prepare_data(config, run_dir, info, objective, reuse_tokenizer=latest is not None)
    tok = data.tokenizer
    token_ids = None
    if objective == "translation":  # the decoder starts at bos, stops at eos and pads with pad: the tokenizer's
        token_ids = {
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        }
    raw_model = build_model(config, tok.vocab_size, token_ids).to(device)
    if tc.activation_checkpointing:
        enable_activation_checkpointing(raw_model)
    optimizer = build_optimizer(raw_model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, tc.max_steps)
    scaler = torch.amp.GradScaler("cuda") if tc.dtype == "float16" else None

    train_batches = data.train_loader(tc.batch_size * info.world_size)
    state = {"best_val_loss": None, "best_step": None, "evals_without_improvement": 0, "tokens_seen": 0}
    step = 0
    if latest is not None:
        saved = ckpt.load_checkpoint(latest, raw_model, optimizer, scheduler)
        step = int(saved["step"])
        train_batches.load_state_dict(saved["loader"])
        state.update({k: saved[k] for k in state if k in saved})
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        _say(info, f"resumed from {latest} at step {step}")

    model = wrap_model(raw_model, info)
    if tc.compile:
        model = torch.compile(model)

    from lmforge.models import count_parameters, flops_per_token

    tokens_per_step = tc.batch_size * info.world_size * tc.grad_accum * config.data.block_size
    flops = flops_per_token(raw_model, config.data.block_size)
    peak = None
    if tc.progress and info.is_main:
        from lmforge.train.logging import measure_peak_flops

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep the run's RNG
            peak = measure_peak_flops(torch.bfloat16 if tc.dtype == "bfloat16" else torch.float32, device=device)
    logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard, enabled=info.is_main)
    progress = TrainProgress(tc.max_steps, start_step=step, enabled=tc.progress and info.is_main)
    _say(
        info,
        f"pretraining {config.model.name} ({count_parameters(raw_model) / 1e6:.2f}M parameters, {objective}) on "
        f"{config.data.dataset}: {data.n_train_tokens:,} train tokens, vocab {data.tokenizer.vocab_size}, "
        f"{tokens_per_step:,} tokens/step, {info.world_size} process(es) on {device}; run folder {run_dir}",
    )

    def save(step: int, is_best: bool = False) -> Path | None:
        path = None
        if info.is_main:
            trainer_state = {
                **state,
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
                tokenizer=data.tokenizer,
                keep_last=tc.keep_last,
                is_best=is_best,
            )
        barrier(info)
        return path

    stopped_by, last_eval, skipped = None, None, 0
    window_start, window_tokens = time.perf_counter(), 0
    with Stop() as stop:
        while step < tc.max_steps:
            # ---- one optimizer step over grad_accum micro-batches
            micro = [take_rows(next(train_batches), info, device) for _ in range(tc.grad_accum)]
            loss = backward_accumulated(model, micro, objective, config, info, scaler)
            step_tokens = tokens_per_step if objective != "translation" else pair_tokens(micro) * info.world_size

            if not math.isfinite(loss):
                if tc.nan_policy == "stop":
                    last = ckpt.latest_checkpoint(run_dir)
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
                    raise RuntimeError(
                        f"the training loss became {loss} at step {step + 1}; {kept}. Lower optim.lr, raise "
                        "optim.warmup_steps or use train.dtype=float32, then resume; train.nan_policy=skip skips "
                        "such steps"
                    )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step, skipped = step + 1, skipped + 1
                _say(info, f"step {step}: loss {loss}, step skipped (train.nan_policy=skip)")
                continue

            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.optim.grad_clip).item()
                if config.optim.grad_clip > 0
                else float("nan")
            )
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            state["tokens_seen"] += step_tokens
            window_tokens += step_tokens

            # ---- logging, evaluation, checkpoints
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            step_mfu = None if peak is None else tokens_per_s * flops / peak
            progress.update(step, loss, lr, tokens_per_s, step_mfu)
            if step % tc.log_every == 0 or step == tc.max_steps:
                values = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "grad_norm": grad_norm}
                logger.log(step, values | ({"mfu": step_mfu} if step_mfu is not None else {}))
                window_start, window_tokens = time.perf_counter(), 0
            is_best, early_stop = False, False
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                last_eval = evaluate(model, data, config, info, objective)
                logger.log(step, last_eval, split="val")
                best = state["best_val_loss"]
                if best is None or last_eval["loss"] < best:
                    state.update(best_val_loss=last_eval["loss"], best_step=step, evals_without_improvement=0)
                    is_best = True
                else:
                    state["evals_without_improvement"] += 1
                    patience = tc.early_stopping_patience
                    early_stop = bool(patience) and state["evals_without_improvement"] >= patience
            signalled = stop.signal is not None
            if info.world_size > 1:  # a signal may reach the processes at different steps: stop together
                signalled = all_reduce_sum(torch.tensor(float(signalled), device=device), info).item() > 0
            periodic = tc.save_every and step % tc.save_every == 0
            if periodic or is_best or early_stop or step == tc.max_steps or signalled:
                save(step, is_best=is_best)
            if early_stop:
                stopped_by = "early_stopping"
                _say(info, f"early stopping at step {step}: no better val loss in {tc.early_stopping_patience} evals")
                break
            if signalled:
                stopped_by = signal.Signals(stop.signal).name if stop.signal is not None else "signal"
                _say(info, f"{stopped_by} at step {step}: checkpoint saved; continue with --resume")
                break
    progress.close()
    logger.close()

    summary = {
        "run_dir": str(run_dir),
        "model": config.model.name,
        "dataset": config.data.dataset,
        "parameters": count_parameters(raw_model),
        "objective": objective,
        "steps": step,
        "max_steps": tc.max_steps,
        "tokens_seen": state["tokens_seen"],
        "skipped_steps": skipped,
        "stopped_by": stopped_by,
        "best_val_loss": state["best_val_loss"],
        "best_step": state["best_step"],
        "final_val": last_eval,
        "world_size": info.world_size,
        "device": str(device),
    }
    if info.is_main:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            plot_curves(metrics, run_dir / "loss.png")
            summary["plot"] = str(run_dir / "loss.png")
        if tc.sample_tokens and stopped_by is None and objective in ("causal_lm", "translation"):
            summary["samples"] = write_samples(raw_model, data, config, run_dir)
        write_summary(run_dir, {k: v for k, v in summary.items() if k != "samples"})
    return summary


def check_resumable(path: Path, config: RunConfig) -> None:
    """Refuse to resume a checkpoint written by a run with another model or data config, naming the fields."""
    import json

    state_file = Path(path) / "trainer_state.json"
    if not state_file.is_file():
        return  # load_checkpoint names what is missing
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    saved_config = (saved.get("state") or {}).get("config")
    if not saved_config:
        return
    diffs = differing_fields(config_from_dict(saved_config).to_dict(), config.to_dict())
    if diffs:
        raise ValueError(
            f"cannot resume {path}: the run was saved with another config ({'; '.join(diffs)}); "
            "use the saved settings or start a new run with another train.name"
        )
