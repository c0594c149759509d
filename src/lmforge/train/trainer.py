"""The pretraining recipe: `pretrain(config)` builds tokenizer, data, model and optimizer, then runs one loop.

The loop itself (gradient accumulation normalised over the whole accumulated batch, clipping, NaN handling,
evaluation, checkpoints, signals) is `lmforge.train.loop.train_loop`, shared with fine-tuning; this module
builds what pretraining feeds it. Process r takes rows [r B, (r + 1) B) of each global micro-batch, so N
processes with batch B follow the trajectory of one process with batch N B.

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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.loaders import IGNORE_INDEX
from lmforge.data.tokenizer import write_atomic
from lmforge.nn import Block
from lmforge.nn.loss import cross_entropy
from lmforge.train.config import RunConfig, config_from_dict, differing_fields
from lmforge.train.data import TrainData, prepare_data
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_sum,
    cleanup,
    init_distributed,
    seed_everything,
    wrap_model,
)
from lmforge.train.logging import plot_curves, write_summary
from lmforge.train.loop import Objective, open_run, resume_state, say, take_rows, train_loop
from lmforge.train.loop import autocast as loop_autocast
from lmforge.train.loop import backward_accumulated as loop_backward
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
    return loop_autocast(config.train.dtype, device)


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


class LMObjective(Objective):
    """Pretraining losses: the mean cross-entropy over predicted tokens (every position for causal LM, the
    masked or corrupted ones otherwise, the target side for translation)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (targets_of(batch, self.name) != IGNORE_INDEX).sum()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch, targets_of(batch, self.name))

    def tokens(self, micro: list[dict[str, torch.Tensor]]) -> int:
        return pair_tokens(micro)


def backward_accumulated(model, micro: list[dict], objective: str, config: RunConfig, info: DistInfo, scaler=None):
    """`lmforge.train.loop.backward_accumulated` for a pretraining objective name."""
    return loop_backward(model, micro, LMObjective(objective), config.train.dtype, info, scaler)


def pair_tokens(micro: list[dict]) -> int:
    """Source plus target tokens of padded translation batches (padding not counted)."""
    return sum(int(b["attention_mask"].sum()) + int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)


def _bare(model: nn.Module) -> nn.Module:
    from lmforge.train.distributed import unwrap_model

    return unwrap_model(model)


def _is_seq2seq(model: nn.Module) -> bool:
    return getattr(_bare(model).config, "head", "") == "seq2seq_lm"


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


def _pretrain(config: RunConfig, info: DistInfo) -> dict:
    tc, device = config.train, info.device
    run_dir = config.run_dir
    latest = open_run(tc, run_dir, info, MIN_FREE_BYTES)
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
    state = resume_state(latest, raw_model, optimizer, scheduler, train_batches, scaler, info)

    model = wrap_model(raw_model, info)
    if tc.compile:
        model = torch.compile(model)

    from lmforge.models import count_parameters, flops_per_token

    tokens_per_step = tc.batch_size * info.world_size * tc.grad_accum * config.data.block_size
    peak = None
    if tc.progress and info.is_main:
        from lmforge.train.logging import measure_peak_flops

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # keep the run's RNG
            peak = measure_peak_flops(torch.bfloat16 if tc.dtype == "bfloat16" else torch.float32, device=device)
    say(
        info,
        f"pretraining {config.model.name} ({count_parameters(raw_model) / 1e6:.2f}M parameters, {objective}) on "
        f"{config.data.dataset}: {data.n_train_tokens:,} train tokens, vocab {data.tokenizer.vocab_size}, "
        f"{tokens_per_step:,} tokens/step, {info.world_size} process(es) on {device}; run folder {run_dir}",
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
        objective=LMObjective(objective),
        evaluate=lambda: evaluate(model, data, config, info, objective),
        run_dir=run_dir,
        tokenizer=data.tokenizer,
        state=state,
        tokens_per_step=None if objective == "translation" else tokens_per_step,
        flops_per_token=flops_per_token(raw_model, config.data.block_size),
        peak_flops=peak,
    )
    step, stopped_by, last_eval, skipped = result.step, result.stopped_by, result.last_eval, result.skipped
    state = result.state.to_dict()

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
