"""`finetune(config)`: adapt a model to a task with the pretraining loop, then evaluate it honestly.

    records (catalog / derived / files) -> tokenizer + model with the task's head -> LoRA or freezing
    -> features -> `lmforge.train.loop.train_loop` (checkpoints, resume, DDP, logging as in pretraining)
    -> the best checkpoint (by validation loss) -> validation and test metrics, report, plots
    -> run_dir/model/ (loadable with `lmforge.load_model`, plus task.json for evaluate/predict)
    and, with LoRA, run_dir/adapter/ (a peft-format adapter)

`data.augment` adds variants of the training records once the held-out records are split off (per fold with
K-fold; `finetune/augment.py`); `task.baseline` fits baselines on those same training records and scores them
on the same held-out records after the model (`finetune/baselines.py`), reported beside it.

K-fold (`task.kfold=K`): the training and validation records are pooled and split into K folds (stratified
by label for classification); fold k trains on the other K - 1 folds from the same starting weights for the
full budget (no checkpoint choice or early stopping on the held-out fold, which would leak it) and is scored on
fold k; the report gives each metric's mean and sample standard deviation over folds.

The run's length is `train.max_steps` when the user set it, else ceil(epochs x N / global batch) optimizer
steps with epochs = task.epochs (default 3); setting both is refused (`training_steps`). A preset (random
weights) on fewer than `SMALL_DATASET` examples is warned about, naming the task's pretrained model. A run that
fails before it wrote anything of value (a checkpoint, a model, metrics.json) removes the run folder it created.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.datasets import TaskData, load_task_data
from lmforge.finetune.tasks import TASKS, Task, build_task
from lmforge.hf.runs import best_checkpoint
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, cleanup, init_distributed, seed_everything
from lmforge.train.loop import INTERRUPTS, open_run, resume_state, say, train_loop
from lmforge.train.objective import Objective
from lmforge.train.optim import add_loss_groups, build_optimizer, build_scheduler
from lmforge.train.parallel import canonical_rows, fused_layouts, parallel_mode
from lmforge.train.runlock import run_lock
from lmforge.train.sparsity import SPARSITY_FILE, SparsityMasks, sparsity_record

MIN_FREE_BYTES = 64 << 20
TASK_FILE = "task.json"
DEFAULT_EPOCHS = 3.0
SMALL_DATASET = 10_000  # training examples below which random weights rarely learn more than a simple baseline
# (task, the run's records, config) -> (features trained on besides the records', a note for the summary)
ExtraTrain = Callable[[Task, TaskData, FinetuneConfig], tuple[list[dict], dict[str, Any]]]


# ------------------------------------------------------------------------------------------ model + tokenizer


def resolve_model(name: str) -> str:
    """The path of the weights `name` stands for (`lmforge.hf.resolve`: a real model's name, a folder, a
    checkpoint, a run folder, a .gguf file), or the name itself for a preset."""
    from lmforge.hf.resolve import resolve_model as resolve

    path = resolve(name).path
    return str(path) if path is not None else name


def load_tokenizer_for(config: FinetuneConfig, data: TaskData, run_dir: Path, info: DistInfo):
    """The model's own tokenizer; for a preset (random weights) one learned on the training texts, of the kind
    and with the special tokens of the preset's family (`lmforge.train.tokenizer.plan_for_family`)."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    if config.model.tokenizer:
        return load_tokenizer(config.model.tokenizer)
    if config.model.embeddings:  # the embedding rows are the pretrained model's token ids
        from lmforge.models import PRESETS

        if config.model.name not in PRESETS:
            raise ValueError(
                f"model.embeddings={config.model.embeddings!r} seeds a preset's embedding (e.g. --model lstm-seed); "
                f"{config.model.name!r} brings its own weights: drop model.embeddings"
            )
        return load_tokenizer(resolve_model(config.model.embeddings))
    path = Path(resolve_model(config.model.name))
    if path.exists():
        try:
            return load_tokenizer(path)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"{path} has no tokenizer ({error}); pass model.tokenizer=PATH") from None
    from lmforge.models import family_of
    from lmforge.train.tokenizer import plan_for_family, run_tokenizer

    texts = TASKS[config.task.task].texts(data.train)
    plan = plan_for_family(family_of(config.model.name))
    return run_tokenizer("train", texts, run_dir, info, plan, config.model.vocab_size, reuse=True)


def build_finetune_model(config: FinetuneConfig, task: Task, tokenizer) -> nn.Module:
    """The base model with the task's head: real or saved weights (a new head starts fresh), or a preset."""
    from lmforge.models import family_of

    path = Path(resolve_model(config.model.name))
    family = family_of(str(path) if path.exists() else config.model.name)
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
    from lmforge.models import FAMILIES, PRESETS, build_model

    if config.model.name not in PRESETS:
        raise ValueError(
            f"model.name={config.model.name!r} is not a folder, a .gguf file, a real model name or a preset "
            "(lmforge models lists presets)"
        )
    table = pretrained_embeddings(config.model.embeddings) if config.model.embeddings else None
    if table is not None:
        values.update(vocab_size=table.shape[0], d_model=table.shape[1])
    values.setdefault("vocab_size", tokenizer.vocab_size)
    if tokenizer.pad_token_id is not None:
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
    family = PRESETS[config.model.name][0]
    from lmforge.models.config import field_names

    if "max_seq_len" in field_names(FAMILIES[family][0]):  # recurrent and T5 models have no position table
        longest = max(config.data.max_length, config.data.max_target_length) + 2
        values.setdefault("max_seq_len", longest)
    if family == "transformer":
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is not None:
                values.setdefault(name, getattr(tokenizer, name))
    model = build_model(config.model.name, head=task.head, **values)
    if table is not None:
        with torch.no_grad():
            model.tok_emb.weight.copy_(table)
    return model.train()


def pretrained_embeddings(name: str) -> torch.Tensor:
    """The token embedding table (vocab, d) of the model `name` (a real model's name, a folder, a checkpoint):
    a recurrent preset starts from it instead of random vectors (word vectors as in Kim, 2014), with the
    model's own tokenizer, so the rows and the ids agree."""
    from lmforge.hf.load import load_model

    source = load_model(resolve_model(name))
    embedding = getattr(source, "tok_emb", None)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"model.embeddings={name!r} has no token embedding table (tok_emb); pass a BERT/GPT model")
    return embedding.weight.detach().float().clone()


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


# ------------------------------------------------------------------------------------------ DP-SGD


def millions(n: int) -> str:
    """A parameter count for a log line: 22.57M, or the exact count below 10,000 (a linear head's 770)."""
    return f"{n:,}" if n < 10_000 else f"{n / 1e6:.2f}M"


def make_private(config: FinetuneConfig, info: DistInfo, model: nn.Module, optimizer, features, pad_id):
    """The run made private by Opacus (`lmforge.train.privacy.make_private`) over the training features, one
    example each. Returns it and the config it runs with."""
    from functools import partial

    from lmforge.finetune.batches import collate
    from lmforge.train import privacy

    refused = {
        "data.augment (each record's K variants would be K examples of one person: the guarantee would not hold)": bool(
            config.data.augment
        )
    }
    private, config, message = privacy.make_private(
        config, info, model, optimizer, features, partial(collate, pad_id=pad_id), refused
    )
    say(info, message)
    return private, config


# ------------------------------------------------------------------------------------------ one run


def check_length(config: FinetuneConfig) -> None:
    """The run's length is set once: task.epochs or train.max_steps (task.epochs=0 defers to max_steps)."""
    epochs, max_steps = config.task.epochs, config.train.max_steps
    if epochs and max_steps is not None:
        raise ValueError(
            f"both task.epochs={epochs:g} (--epochs) and train.max_steps={max_steps} (--max-steps) are set; "
            "set one: epochs counts passes over the training set, max_steps optimizer steps"
        )
    if epochs == 0 and max_steps is None:
        raise ValueError("task.epochs=0 leaves the length to train.max_steps, which is not set; pass --max-steps N")


def training_steps(config: FinetuneConfig, n_train: int, world_size: int) -> FinetuneConfig:
    """The config with train.max_steps filled in: as set, else ceil(epochs x n_train / (batch_size x world_size x
    grad_accum)) with epochs = task.epochs or DEFAULT_EPOCHS."""
    check_length(config)
    tc = config.train
    if tc.max_steps is not None:
        return config
    epochs = config.task.epochs or DEFAULT_EPOCHS
    per_step = tc.batch_size * world_size * tc.grad_accum
    steps = max(1, math.ceil(epochs * n_train / per_step))
    return dataclasses.replace(config, train=dataclasses.replace(tc, max_steps=steps))


def random_weights_warning(config: FinetuneConfig, n_train: int) -> str | None:
    """One line when the model is a preset (random weights) and the training set is small, naming the task's
    pretrained model: such a run usually scores near chance and looks like a broken recipe."""
    from lmforge.models import PRESETS

    name = config.model.name
    if name not in PRESETS or Path(name).exists() or n_train >= SMALL_DATASET:
        return None
    task = TASKS[config.task.task]
    advice = (
        f"for a pretrained start use --model {task.default_model}"
        if task.default_model not in PRESETS
        else f"no pretrained {task.name} model ships with lmforge, so expect low scores on little data"
    )
    return (
        f"warning: {name} is a preset with random weights and the training set has {n_train:,} {task.record_unit} "
        f"(< {SMALL_DATASET:,}): it will learn little; {advice}"
    )


def load_notes(caught: list[warnings.WarningMessage], model: nn.Module, task: Task) -> list[str]:
    """One line for the loader's warning that the task's head is new (`lmforge.hf.load`: a multi-line list of
    tensors and a cache path): a fresh head is what fine-tuning asked for. Other warnings are re-issued."""
    notes = []
    for w in caught:
        if f"head={task.head!r} instead of" in str(w.message):
            modules = ", ".join(n for n, _ in model.named_children() if n in ("classifier", "lm_head")) or task.head
            notes.append(f"new head: {modules} initialised randomly (expected for fine-tuning)")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return notes


def holds_results(run_dir: Path) -> bool:
    """Whether a run folder holds anything worth keeping: a checkpoint, a saved model or a metrics.json."""
    return any(p.parent.name == "checkpoints" or p.name in ("model", "metrics.json") for p in run_dir.rglob("*"))


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finetune(
    config: FinetuneConfig,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    score_test: bool = True,
    objective: Callable[[Task, nn.Module], Objective] | None = None,
    extra_train: ExtraTrain | None = None,
) -> dict:
    """Fine-tune and evaluate; returns the run summary (with K-fold: the fold summary). A failure before the run
    wrote anything of value removes the run folder, if this call created it. `on_eval(step, metrics)` sees every
    validation during training (`train_loop`'s hook); with K-fold, whose folds evaluate once at their end, it is
    called after fold k with step k and the mean of each metric over the k folds done, so a tuner can stop a
    poor configuration between folds; `score_test=False` leaves the test split untouched (a tuner's trials
    select on validation only); `objective(task, model)`, when given, is the training loss instead of the task's
    own (distillation wraps the task with a teacher), built once the model is (every fold builds its own); its
    `loss_module`, if any, trains with the model and lives in the checkpoints; evaluation and the saved model are
    the task's as always. `extra_train(task, data, config)`, when given, returns features trained on besides the
    training records' and a note for the summary (distillation's unlabelled transfer set), per fold with K-fold."""
    config = config.with_model_name()
    check_length(config)
    created = not config.run_dir.exists()
    info = init_distributed(config.train.device)
    try:
        with run_lock(config.run_dir, enabled=info.is_main):
            if config.task.kfold:
                return _kfold(config, info, on_eval, objective, extra_train)
            return _finetune(
                config, info, on_eval=on_eval, score_test=score_test, objective=objective, extra_train=extra_train
            )
    except BaseException:
        if created and info.is_main and config.run_dir.is_dir() and not holds_results(config.run_dir):
            shutil.rmtree(config.run_dir, ignore_errors=True)
        raise
    finally:
        cleanup(info)


def _finetune(
    config: FinetuneConfig,
    info: DistInfo,
    data: TaskData | None = None,
    report: bool = True,
    save_model: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    score_test: bool = True,
    objective: Callable[[Task, nn.Module], Objective] | None = None,
    extra_train: ExtraTrain | None = None,
) -> dict:
    tc, device = config.train, info.device
    run_dir = config.run_dir
    mode = parallel_mode(tc.parallel)
    if mode.tensor_parallel and config.task.method == "lora":
        raise ValueError(f"train.parallel={mode.name} splits the Linear layers LoRA wraps; use fsdp or ddp with LoRA")
    info = mode.place(info, tc)
    baselines = check_baselines(config, info)
    train_baseline = baseline_trainer(config, info)
    from lmforge.finetune.augment import augment_training, check_augment

    check_augment(config)
    latest = open_run(tc, run_dir, info, MIN_FREE_BYTES)
    seed_everything(tc.seed, tc.deterministic)

    if data is None:  # a fold gets its data, and the warning, from `_kfold`
        data = load_task_data(config)
        if warning := random_weights_warning(config, len(data.train)):
            say(info, warning)
    data, augmented = augment_training(config, data)  # training records only, after validation/test are split off
    if augmented:
        say(info, f"{augmented['method']}: {augmented['original']} training examples + {augmented['added']} variants")
    tokenizer = load_tokenizer_for(config, data, run_dir, info)
    task = build_task(config, tokenizer, data)
    train_features = task.encode(data.train, "train")
    val_features = task.encode(data.validation, "validation")
    test_features = task.encode(data.test, "test") if data.test and score_test else None
    if not train_features:
        raise ValueError("no training features were produced; check the data and data.max_length")
    extra = None
    if extra_train is not None:
        more, extra = extra_train(task, data, config)
        train_features = train_features + more
        say(info, f"and {len(more)} unlabelled examples: " + ", ".join(f"{k} {v}" for k, v in extra.items()))
    config = training_steps(config, len(train_features), info.dp_size)
    task.config, tc = config, config.train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw_model = build_finetune_model(config, task, tokenizer)
    for note in load_notes(caught, raw_model, task):
        say(info, note)
    raw_model = raw_model.to(device)
    mode.check(raw_model.config, tc, info.world_size)
    sparsity = pruned_masks(config, raw_model, mode)
    counts = adapt(raw_model, config)
    training_loss = task if objective is None else objective(task, raw_model)
    if training_loss.loss_module is not None:
        training_loss.loss_module.to(device)
    raw_model = mode.shard(raw_model, info, tc)  # LoRA's weights included; before the optimizer sees them
    optimizer = build_finetune_optimizer(raw_model, config)
    add_loss_groups(optimizer, training_loss.loss_module, config.optim)
    if sparsity is not None:
        sparsity[0].attach(optimizer)
        say(info, f"keeping the model's zeros: {sparsity[0].overall():.1%} of its pruned layers' weights")
    warmup = config.optim.warmup_steps
    scheduler = build_scheduler(optimizer, config.optim, tc.max_steps) if warmup < tc.max_steps else None
    if scheduler is None:
        raise ValueError(f"optim.warmup_steps={warmup} must be below the run's {tc.max_steps} steps")
    scaler = torch.amp.GradScaler("cuda") if tc.dtype == "float16" else None

    from lmforge.finetune.batches import FeatureBatches
    from lmforge.train.batches import Endless

    global_batch = tc.batch_size * info.dp_size
    if len(train_features) < global_batch:
        raise ValueError(
            f"{len(train_features)} training {task.feature_unit} cannot fill one batch of {global_batch}; "
            "lower train.batch_size"
        )
    loader = FeatureBatches(
        train_features, global_batch, pad_id=task.pad_id, seed=tc.seed, shuffle=True, drop_last=True
    )
    train_batches = Endless(loader)
    privacy = None
    if config.privacy.epsilon is not None:
        if training_loss.loss_module is not None:
            raise ValueError(
                "privacy.epsilon clips per-example gradients of the model only, and this run's loss trains weights "
                "of its own (distillation's width projections): drop privacy.epsilon or the hidden/cosine terms"
            )
        privacy, config = make_private(config, info, raw_model, optimizer, train_features, task.pad_id)
        optimizer, train_batches, tc = privacy.optimizer, Endless(privacy.loader), config.train
    state = resume_state(
        latest, raw_model, optimizer, scheduler, train_batches, scaler, info, training_loss.loss_module
    )
    model = mode.wrap(raw_model, info) if privacy is None else privacy.training_model
    if tc.compile:
        model = torch.compile(model)

    say(
        info,
        f"fine-tuning {config.model.name} for {task.name} ({millions(counts['trainable_parameters'])} of "
        f"{millions(counts['parameters'])} parameters trained, {config.task.method}) on {data.source}: "
        f"{len(data.train)} train / {len(data.validation)} validation / {len(data.test or [])} test "
        f"{task.record_unit}, "
        f"{tc.max_steps} steps; run folder {run_dir}",
    )
    for key, value in task.stats.items():
        if key.endswith("truncated") and value:
            say(info, f"{key.replace('_', ' ')}: {value} inputs longer than data.max_length={config.data.max_length}")
        elif value and "unseen" in key:
            say(info, f"warning: {key.replace('_', ' ')}: {value} (never predicted, so they count as errors)")

    def evaluate() -> dict[str, float]:
        metrics, _ = task.evaluate(model, data.validation, val_features, final=False)
        return numbers(metrics)

    start = time.perf_counter()
    result = train_loop(
        config=config,
        info=info,
        model=model,
        raw_model=raw_model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_batches=train_batches,
        objective=training_loss,
        evaluate=evaluate,
        run_dir=run_dir,
        tokenizer=tokenizer,
        state=state,
        tokens_per_step=None,
        flops_per_token=0,
        peak_flops=None,
        on_eval=on_eval,
        hook=privacy,
        sharded=mode.sharded,
    )
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": config.model.name,
        "task": task.name,
        "method": config.task.method,
        "dataset": data.source,
        **counts,
        "steps": result.step,
        "train_seconds": time.perf_counter() - start,
        "stopped_by": result.stopped_by,
        "best_step": result.state.best_step,
        "best_val_loss": result.state.best_val_loss,
        "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test or [])},
        "counts": dict(task.stats),
    }
    if augmented:
        summary["augmented"] = augmented
    if extra is not None:
        summary["transfer"] = extra
    if privacy is not None:
        summary["privacy"] = privacy.summary()
        say(
            info,
            f"DP-SGD: ε={summary['privacy']['epsilon_spent']:.3f} spent of {config.privacy.epsilon:g} "
            f"(δ={config.privacy.delta:g})",
        )
    if result.stopped_by not in (None, "early_stopping"):
        return summary  # interrupted: --resume continues; nothing final to write
    best = best_checkpoint(run_dir)
    if best is not None and result.state.best_step != result.step:
        ckpt.load_checkpoint(best, raw_model, None, None)  # the best validation loss, as the final model
        say(info, f"using the best checkpoint {best.name} (validation loss {result.state.best_val_loss:.4f})")
    if mode.sharded:  # the final evaluation and save run on rank 0 alone: give it the whole model
        raw_model = whole_model(raw_model, config, task, tokenizer, device)
    if not info.is_main:
        return summary
    with task.reporting_progress("validation"):
        val_metrics, val_arrays = task.evaluate(raw_model, data.validation, val_features)
    summary["validation"] = val_metrics
    if test_features is not None:
        with task.reporting_progress("test"):
            test_metrics, test_arrays = task.evaluate(raw_model, data.test, test_features)
        summary["test"] = test_metrics
    else:
        test_arrays = None
    if baselines:
        from lmforge.finetune.baselines import run_baselines

        splits = {"validation": data.validation, **({"test": data.test} if test_features is not None else {})}
        summary["baselines"] = run_baselines(
            baselines,
            task,
            data.train,
            splits,
            lambda preset, settings: train_baseline(preset, settings, data, "test" in splits),
        )
    if sparsity is not None:
        summary["sparsity"] = sparsity[0].overall()
    if save_model:
        save_final(raw_model, task, config, run_dir, sparsity)
        summary["model_dir"] = str(run_dir / "model")
    if report:
        from lmforge.finetune.reporting import write_run_report

        write_run_report(run_dir, summary, val_arrays, test_arrays)
    return summary


def check_baselines(config: FinetuneConfig, info: DistInfo) -> list[str]:
    """The run's baselines (`lmforge.finetune.baselines`), refused before training when they cannot run."""
    from lmforge.finetune.baselines import BASELINES, baseline_names

    names = baseline_names(config.task.baseline, config.task.task)
    for name in names:
        BASELINES[name].check(config)
    if "lstm" in names and info.world_size > 1:
        raise ValueError("task.baseline=lstm trains a second model, which runs in one process; drop it under torchrun")
    return names


def baseline_trainer(config: FinetuneConfig, info: DistInfo) -> Callable[[str, dict, TaskData, bool], dict]:
    """train(preset, settings, data, score_test): the summary of `preset` fine-tuned by this recipe on the run's
    very data (its splits or fold, already augmented), in run_dir/baselines/<preset>, with the run's settings
    except the model's own and `settings` ({"optim.lr": 2e-3, ...}); its length comes from the settings' epochs."""

    def train(preset: str, settings: dict[str, Any], data: TaskData, score_test: bool) -> dict:
        sections = {
            "model": dataclasses.replace(config.model, name=preset, tokenizer="", embeddings="", overrides={}),
            "data": dataclasses.replace(config.data, augment=""),
            "task": dataclasses.replace(
                config.task,
                baseline="",
                method="full",
                kfold=0,
                freeze_embeddings=False,
                freeze_layers=0,
                layer_lr_decay=1.0,
            ),
            "optim": config.optim,
            "train": dataclasses.replace(
                config.train, out=str(config.run_dir / "baselines"), name=preset, max_steps=None, resume=False
            ),
        }
        for key, value in settings.items():
            section, field = key.split(".")
            sections[section] = dataclasses.replace(sections[section], **{field: value})
        say(info, f"baseline {preset}: trained by this recipe on the same records")
        return _finetune(FinetuneConfig(**sections), info, data, report=False, save_model=False, score_test=score_test)

    return train


def task_record(task: Task, config: FinetuneConfig) -> dict:
    """What evaluate/predict need to rebuild the task around a saved model (`Task.from_saved`)."""
    return {
        "task": task.name,
        "data": dataclasses.asdict(config.data),
        "config": config.to_dict(),
        **task.saved_fields(),
    }


def whole_model(sharded: nn.Module, config: FinetuneConfig, task: Task, tokenizer, device) -> nn.Module:
    """An unsharded copy of an FSDP/TP model on every rank (collective: each rank gathers the full state), built
    as the run built it (model, head, LoRA) so that its names match."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for name, (sections, tp) in fused_layouts(sharded).items():  # TP's fused q/k/v: back to the layer's rows
        state[name] = canonical_rows(state[name], sections, tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes were said when the run built its model
        model = build_finetune_model(config, task, tokenizer).to(device)
    adapt(model, config)
    model.load_state_dict(state)
    return model


def save_final(
    model: nn.Module,
    task: Task,
    config: FinetuneConfig,
    run_dir: Path,
    sparsity: tuple[SparsityMasks, dict[str, Any]] | None = None,
) -> None:
    """run_dir/model: the fine-tuned model (LoRA merged) in lmforge's format with tokenizer and task.json;
    run_dir/adapter: the LoRA adapter alone, loadable by peft. A pruned model trained with its zeros kept also
    gets a sparsity.json: the pruning record, each layer's fraction of zeros measured again, and this run."""
    import copy

    from lmforge.hf.save import save_model
    from lmforge.io import write_json_atomic

    final = model
    if config.task.method == "lora":
        from lmforge.finetune.peft_format import save_adapter

        save_adapter(model, run_dir / "adapter", base_model_name_or_path=config.model.name)
        from lmforge.finetune.lora import merge_lora

        final = merge_lora(copy.deepcopy(model))
    final = final.eval()
    for p in final.parameters():
        p.requires_grad_(True)
    save_model(final, run_dir / "model", tokenizer=task.saved_tokenizer(), overwrite=True)
    write_json_atomic(run_dir / "model" / TASK_FILE, task_record(task, config))
    if sparsity is not None:
        masks, record = sparsity
        record = {**record, "layers": masks.fractions(), "overall": masks.overall(), "fine_tuned": str(run_dir)}
        write_json_atomic(run_dir / "model" / SPARSITY_FILE, record)


def pruned_masks(config: FinetuneConfig, model: nn.Module, mode: Any) -> tuple[SparsityMasks, dict[str, Any]] | None:
    """The zeros to keep while training a model that `lmforge prune` sparsified (`task.keep_sparsity`), with its
    sparsity.json record; None for any other model. LoRA and sharded training are refused on such a model: the
    merged update B A is dense, and a sharded weight is not the matrix the mask was read from."""
    path = Path(resolve_model(config.model.name))
    record = sparsity_record(path) if path.is_dir() else None
    if record is None or not config.task.keep_sparsity:
        return None
    if config.task.method == "lora":
        raise ValueError(
            f"{config.model.name} is pruned (its sparsity.json) and LoRA's merged update B A is dense, so it would "
            "refill the zeros: use task.method=full, which keeps them, or task.keep_sparsity=false"
        )
    if mode.sharded or mode.tensor_parallel:
        raise ValueError(
            f"{config.model.name} is pruned (its sparsity.json) and train.parallel={mode.name} shards the weights "
            "whose zeros are kept: use train.parallel=ddp (or none), or task.keep_sparsity=false"
        )
    return SparsityMasks(model, list(record["layers"])), record


# ------------------------------------------------------------------------------------------ K-fold


def _kfold(
    config: FinetuneConfig,
    info: DistInfo,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    objective: Callable[[Task, nn.Module], Objective] | None = None,
    extra_train: ExtraTrain | None = None,
) -> dict:
    from lmforge.eval import kfold_indices, stratified_kfold_indices, summarize_folds

    k = config.task.kfold
    data = load_task_data(config)
    pool = data.train + data.validation
    if warning := random_weights_warning(config, len(pool)):
        say(info, warning)
    labels = TASKS[config.task.task].strata(pool)
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
        summary = _finetune(
            fold_config, info, fold_data, save_model=False, objective=objective, extra_train=extra_train
        )  # model: a by-product
        if summary.get("stopped_by") in INTERRUPTS:  # Ctrl-C stops the K-fold run, not just this fold
            return {**summary, "run_dir": str(base_dir), "kfold": k, "folds_done": i}
        fold_summaries.append(summary)
        fold_metrics.append({**numbers(summary.get("validation", {})), "train_seconds": summary.get("train_seconds")})
        if on_eval is not None:  # the running mean over the folds done (a pruner's intermediate value)
            on_eval(i + 1, {name: value["mean"] for name, value in summarize_folds(fold_metrics).items()})
    summary = {
        "run_dir": str(base_dir),
        "model": config.model.name,
        "task": config.task.task,
        "dataset": data.source,
        "kfold": k,
        "folds": summarize_folds(fold_metrics),
        "examples": len(pool),
    }
    names = [name for name in fold_summaries[0].get("baselines", {})] if fold_summaries else []
    if names:  # each baseline's held-out scores on the very same folds, summarised the same way
        summary["baselines"] = {
            name: summarize_folds(
                [
                    {**numbers(s["baselines"][name].get("validation", {})), "seconds": s["baselines"][name]["seconds"]}
                    for s in fold_summaries
                ]
            )
            for name in names
        }
    if info.is_main:
        from lmforge.finetune.reporting import write_kfold_report

        write_kfold_report(base_dir, summary, fold_summaries)
    return summary
