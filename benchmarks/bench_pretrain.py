"""Pretraining speed and quality against two plain PyTorch peers trained by the same bare loop.

Peers: (1) "nanogpt": a GPT written here to nanoGPT's published design (karpathy/nanoGPT model.py): pre-norm
blocks, LayerNorms and Linears without biases, exact GELU, `F.scaled_dot_product_attention(is_causal=True)`, the
output projection tied to the token embedding, N(0, 0.02) init with the residual projections at
0.02 / sqrt(2 L), `torch.optim.AdamW` with decay on the matrices only and its CPU default implementation;
(2) "hf": `transformers.GPT2LMHeadModel` of the same shapes ("gelu_pytorch_tanh", its fast configuration).
The loop is nanoGPT's: AdamW, warmup + cosine, clip 1.0, no host sync but the loss.

1. Throughput: training tokens/s and MFU of lmforge's recipe (`lmforge.pretrain.trainer.pretrain`, the real loop:
   data, gradient accumulation bookkeeping, clipping, AdamW with decay groups, schedule, logging) configured to
   the nanoGPT design (no biases, exact GELU), interleaved round by round with the peers on the same
   tiny-Shakespeare characters, same threads, fp32 and bf16 autocast; the ratio is the median of the rounds'
   ratios. Each run has a fresh process of its own (as `python train.py` or `lmforge pretrain` would), so no
   contestant inherits another's allocator state, thread pools or caches (`--same-process` to time all in one).
   Shape sets: (a) 4 layers, 4 heads, 128 wide, block 64, batch 12; (b) 6 layers, 6 heads, 384 wide, block
   256, batch 64. MFU = tokens/s x FLOPs/token / matmul peak measured here. `--lmforge-flag` adds flags
   to lmforge's runs (e.g. train.compile=true). Results: benchmarks/results/pretrain_throughput.json.
2. The 180-second race: validation loss (nats/char on the whole validation split, nanoGPT's split: first 90%
   train, last 10% validation) reached in a fixed wall-clock budget: nanoGPT's documented CPU recipe
   (4 layers, 4 heads, 128 wide, block 64, batch 12, lr 1e-3 cosine to 1e-4 over 2000 iters, 100 warmup,
   AdamW betas (0.9, 0.99), dropout 0) as a plain loop around GPT2LMHeadModel, against lmforge's CPU recipe.
   lmforge's run is sized to the budget by a probe (10 warm-up steps, then 60 timed ones, in the same process);
   its clock covers the whole `pretrain` call: data, tokenizer training (`--race-flag data.tokenizer=train`),
   model, compilation (from inductor's cache, warmed by the probe), training and the final checkpoint. A
   subword model is scored on the same scale: its summed loss over the characters its tokens spell
   (`nats_per_char`), each character of the split predicted once, as bits per byte compare tokenizers.

    .venv/bin/python benchmarks/bench_pretrain.py [--steps-a 40] [--steps-b 4] [--rounds 3] [--shapes a,b]
        [--dtypes float32,bfloat16] [--peers nanogpt,hf] [--lmforge-flag train.compile=true] [--skip-race]
        [--race-shape 4,4,128] [--race-batch 32] [--race-lr 3e-3] [--race-dtype float32] [--race-compile]
        [--race-block 64] [--race-model gpt] [--race-overrides '{"activation": "gelu"}'] [--race-flag optim.name=muon]
        [--race-baseline 1.7555 (skip the nanoGPT run)] [--race-out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.models import build_model, flops_per_token
from lmforge.nn.precision import bf16_product_dtype
from lmforge.pretrain.config import parse_args
from lmforge.pretrain.trainer import pretrain
from lmforge.train.logging import measure_peak_flops

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "a": {"n_layer": 4, "n_head": 4, "d_model": 128, "block": 64, "batch": 12},
    "b": {"n_layer": 6, "n_head": 6, "d_model": 384, "block": 256, "batch": 64},
}


def nanogpt_split(text: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)}
    ids = np.array([vocab[c] for c in text], dtype=np.int64)
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:], vocab


def hf_model(shape: dict, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=shape["block"], n_embd=shape["d_model"], n_layer=shape["n_layer"],
        n_head=shape["n_head"], activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class PeerBlock(torch.nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)): nanoGPT's pre-norm block, without biases."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = torch.nn.LayerNorm(d, bias=False)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = torch.nn.Linear(d, d, bias=False)
        self.ln_2 = torch.nn.LayerNorm(d, bias=False)
        self.fc = torch.nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = torch.nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.fc(self.ln_2(x))))


class PeerGPT(torch.nn.Module):
    """The nanoGPT-style peer (see the module docstring); `model(input_ids=x, labels=x).loss` as the loop calls
    it: position t predicts token t + 1."""

    def __init__(self, vocab_size: int, block: int, n_layer: int, n_head: int, d_model: int) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab_size, d_model)
        self.wpe = torch.nn.Embedding(block, d_model)
        self.blocks = torch.nn.ModuleList(PeerBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = torch.nn.LayerNorm(d_model, bias=False)
        self.lm_head = torch.nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        from types import SimpleNamespace

        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return SimpleNamespace(logits=logits, loss=loss)


def peer_model(name: str, shape: dict, vocab_size: int) -> torch.nn.Module:
    if name == "hf":
        return hf_model(shape, vocab_size)
    return PeerGPT(vocab_size, shape["block"], shape["n_layer"], shape["n_head"], shape["d_model"])


def windows(tokens: np.ndarray, batch: int, block: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - block, size=batch)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(block)])


def peer_loop(
    model, train, shape, dtype, steps=None, seconds=None, lr=1e-3, min_lr=1e-4, warmup=100, total=2000, device="cpu"
):
    """nanoGPT-style loop: AdamW, warmup + cosine, clip 1.0; returns (tokens/s after the first step, steps).
    On a GPU the clock reads after a synchronise, so queued kernels count."""
    device = torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # nanoGPT: weight decay on the matrices (2-D), none on norms and biases
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.99))

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    rng = np.random.default_rng(0)
    model.train()
    start, step = None, 0
    while True:
        if step == 1:
            start = now()
        if steps is not None and step >= steps:
            break
        if seconds is not None and start is not None and time.perf_counter() - start > seconds:
            break
        if step < warmup:
            rate = lr * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            rate = min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
        for group in optimizer.param_groups:
            group["lr"] = rate
        x = windows(train, shape["batch"], shape["block"], rng).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    elapsed = now() - start
    return shape["batch"] * shape["block"] * (step - 1) / elapsed, step


@torch.no_grad()
def full_split_nll(logits_of, tokens: np.ndarray, block: int) -> tuple[float, int]:
    """Summed loss (nats) over every token of `tokens` after the first, and how many tokens that is: windows of
    `block` tokens overlapping by one, so each token is predicted once."""
    total, count = 0.0, 0
    starts = list(range(0, len(tokens) - 1, block - 1))
    for i in range(0, len(starts), 64):
        rows = [tokens[s : s + block] for s in starts[i : i + 64]]
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, row in enumerate(rows):
            batch[r, : len(row)] = torch.from_numpy(row)
        logits = logits_of(batch.clamp(min=0)).float()
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total, count = total + loss.item(), count + int((targets != -100).sum())
    return total, count


def full_split_loss(logits_of, tokens: np.ndarray, block: int) -> float:
    """Mean loss over every token of `tokens` after the first (nats per character for a character vocabulary)."""
    total, count = full_split_nll(logits_of, tokens, block)
    return total / count


def nats_per_char(logits_of, tokenizer, text: str, block: int) -> float:
    """Loss over `text` in nats per character, whatever the tokenizer: the summed loss of every token after the
    first, over the characters those tokens spell. A tokenizer whose tokens span several characters (BPE) is
    scored on the same scale as a character model (the split's characters, each predicted once), as bits per
    byte are compared across tokenizers. The tokens must spell `text` exactly."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        raise ValueError("the tokenizer does not spell the validation text back exactly; nats/char undefined")
    total, _ = full_split_nll(logits_of, np.asarray(ids, dtype=np.int64), block)
    return total / (len(text) - len(tokenizer.decode(ids[:1])))


def lmforge_flags(
    shape: dict, out: Path, dtype: str, steps: int, name: str, extra: dict | None = None, device: str = "cpu"
) -> list[str]:
    values = {
        "model.name": "gpt",
        "model.overrides": json.dumps({k: shape[k] for k in ("n_layer", "n_head", "d_model")}),
        "data.dataset": str(out / "train.txt"),
        "data.block_size": shape["block"],
        "data.val_fraction": 0.02,
        "train.batch_size": shape["batch"],
        "train.max_steps": steps,
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.save_every": 0,
        "train.log_every": 5,
        "train.out": str(out),
        "train.name": name,
        "train.dtype": dtype,
        "train.progress": False,
        "train.tensorboard": False,
        "train.sample_tokens": 0,
        "train.device": device,
        **(extra or {}),
    }
    return [f"--{k}={v}" for k, v in values.items()]


def lmforge_tokens_per_s(run: Path) -> float:
    """Tokens/s of the run after its first logging window (warm-up, compilation), as the peers' rate is taken
    over their whole run after its first step. The windows hold the same number of steps, so the rate over all
    of them is the harmonic mean of theirs (their median, used before, left out the slow windows that the
    peers' clock counts)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]  # the first window has warm-up
    return len(rates) / sum(1.0 / r for r in rates)


def peer_rate(name: str, shape: dict, vocab_size: int, train_ids, dtype: str, steps: int, seed: int) -> float:
    """Tokens/s of one peer run (`peer_loop`) from seed `seed`."""
    torch.manual_seed(seed)
    rate, _ = peer_loop(peer_model(name, shape, vocab_size), train_ids, shape, dtype, steps=steps)
    return rate


def lmforge_rate(flags: list[str]) -> float:
    """Tokens/s of one `pretrain` run with these flags (see `lmforge_tokens_per_s`)."""
    config = parse_args(flags)
    pretrain(config)
    return lmforge_tokens_per_s(Path(config.train.out) / config.train.name)


def _in_child(threads: int, fn, fn_args: tuple) -> float:
    torch.set_num_threads(threads)
    return fn(*fn_args)


def contestant(args, fn, *fn_args) -> float:
    """One timed run, in a process of its own (spawned: a fresh interpreter) unless --same-process: each
    contestant starts from the state a user's `python train.py` or `lmforge pretrain` starts from, whatever the
    previous runs did to the allocator, the thread pools or the caches of this process."""
    if args.same_process:
        return fn(*fn_args)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_in_child, (torch.get_num_threads(), fn, fn_args))


def throughput(args, train_ids: np.ndarray, vocab_size: int, out: Path, peaks: dict) -> dict:
    """Interleaved rounds: each peer, then lmforge, the same steps each; per-round ratios and their median."""
    design = {"bias": False, "activation": "gelu"}  # lmforge configured to the nanoGPT peer's design
    extra = dict(flag.split("=", 1) for flag in args.lmforge_flag)
    results = {"threads": torch.get_num_threads(), "rounds": args.rounds, "lmforge_flags": extra, "rows": []}
    print(f"{'shape':5} {'dtype':9} {'contestant':10} {'tok/s (median)':>15} {'MFU':>6} {'lmforge / it':>13}  rounds")
    for key in args.shapes:
        shape = SHAPES[key]
        steps = args.steps_a if key == "a" else args.steps_b
        flops = flops_per_token(
            build_model("gpt", n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"],
                        vocab_size=vocab_size, max_seq_len=shape["block"], **design),
            shape["block"],
        )  # fmt: skip
        for dtype in args.dtypes:
            rates: dict[str, list[float]] = {name: [] for name in [*args.peers, "lmforge"]}
            for r in range(args.rounds):
                for name in args.peers:
                    rates[name].append(
                        contestant(args, peer_rate, name, shape, vocab_size, train_ids, dtype, steps + 1, r)
                    )
                run_name = f"tp-{key}-{dtype}-{r}"
                overrides = {"model.overrides": json.dumps({**{k: shape[k] for k in ("n_layer", "n_head", "d_model")},
                                                            **design}), **extra}  # fmt: skip
                rates["lmforge"].append(
                    contestant(args, lmforge_rate, lmforge_flags(shape, out, dtype, steps + 5, run_name, overrides))
                )
            row = {"shape": key, **shape, "dtype": dtype, "flops_per_token": flops, "contestants": {}}
            for name, values in rates.items():
                ratios = [ours / theirs for ours, theirs in zip(rates["lmforge"], values, strict=True)]
                median = float(np.median(values))
                row["contestants"][name] = {
                    "tokens_per_s": values,
                    "median": median,
                    "mfu": median * flops / peaks[dtype],
                    "lmforge_ratio_median": float(np.median(ratios)),
                    "lmforge_ratio_range": [min(ratios), max(ratios)],
                }
                print(
                    f"({key})   {dtype:9} {name:10} {median:15,.0f} {median * flops / peaks[dtype]:6.1%} "
                    f"{np.median(ratios):12.2f}x  {' '.join(f'{x:.2f}' for x in ratios)}",
                    flush=True,
                )
            results["rows"].append(row)
    return results


def race(args, text: str, out: Path) -> None:
    train_ids, val_ids, vocab = nanogpt_split(text)
    shape = SHAPES["a"]
    result: dict = {"seconds": args.race_seconds}
    if args.race_baseline is None:
        torch.manual_seed(1337)
        model = hf_model(shape, len(vocab))
        _, steps = peer_loop(model, train_ids, shape, "float32", seconds=args.race_seconds)
        model.eval()
        baseline = full_split_loss(lambda x: model(input_ids=x).logits, val_ids, shape["block"])
        result["nanogpt_recipe"] = {"steps": steps, "val_nats_per_char": baseline}
        print(
            f"nanoGPT CPU recipe (HF GPT-2 loop): {steps} steps in {args.race_seconds:.0f} s, "
            f"val {baseline:.4f} nats/char"
        )
    else:
        baseline = args.race_baseline
        result["nanogpt_recipe"] = {"val_nats_per_char": baseline, "recorded": True}

    # lmforge's recipe: its own shape (--race-shape L,H,D), batch, peak lr, dtype and compile; the cosine schedule
    # is sized to the time budget (nanoGPT's decays over 2000 iterations and then idles at min_lr)
    n_layer, n_head, d_model = args.race_shape
    block = args.race_block
    ours_shape = {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, "block": block, "batch": args.race_batch}
    model_overrides = {"n_layer": n_layer, "n_head": n_head, "d_model": d_model, **json.loads(args.race_overrides)}
    extra = {
        "model.name": args.race_model, "model.overrides": json.dumps(model_overrides),
        "optim.lr": args.race_lr, "optim.min_lr": args.race_lr / 10, "optim.warmup_steps": 100, "optim.beta2": 0.99,
        "train.compile": args.race_compile,
        **dict(flag.split("=", 1) for flag in args.race_flag),
    }  # fmt: skip
    # a few warm-up steps first: the process's one-time costs (oneDNN's kernel generation for each bf16 shape,
    # lazy imports) are not the race run's, and counted in the probe they sized runs that ended at 150-165 s
    start = time.perf_counter()
    pretrain(parse_args(lmforge_flags(ours_shape, out, args.race_dtype, 10, "race-warmup", extra)))
    warmup_seconds = time.perf_counter() - start
    probe = "race-probe"  # calibrate steps per second, then size the schedule to the budget
    probe_steps = 60
    start = time.perf_counter()
    pretrain(parse_args(lmforge_flags(ours_shape, out, args.race_dtype, probe_steps, probe, extra)))
    probe_seconds = time.perf_counter() - start
    tokens_per_step = ours_shape["batch"] * ours_shape["block"]
    rate = lmforge_tokens_per_s(out / probe) / tokens_per_step  # steady steps per second
    fixed = max(0.0, probe_seconds - probe_steps / rate)  # setup, compilation, the final checkpoint
    # --race-margin of what the budget leaves after the fixed costs: the clock below includes them
    steps = int(rate * (args.race_seconds - fixed) * args.race_margin)
    start = time.perf_counter()
    pretrain(parse_args(lmforge_flags(ours_shape, out, args.race_dtype, steps, "race", extra)))
    elapsed = time.perf_counter() - start
    from lmforge import load_model
    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    run = out / "race"
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    model = load_model(run / "checkpoints" / latest)
    tokenizer = load_tokenizer(run / "tokenizer")
    val_text = text[int(len(text) * 0.9) :]
    ours = nats_per_char(lambda x: model(input_ids=x).logits, tokenizer, val_text, ours_shape["block"])
    recipe = (
        f"{args.race_model} {n_layer} x {d_model} ({n_head} heads), block {block}, batch {args.race_batch}, "
        f"lr {args.race_lr:g}, {args.race_dtype}{', compiled' if args.race_compile else ''}"
        + "".join(f", {flag}" for flag in args.race_flag)
        + (f", {args.race_overrides}" if args.race_overrides != "{}" else "")
    )
    result["lmforge"] = {
        "recipe": recipe,
        "steps": steps,
        "warmup_seconds_10_steps": warmup_seconds,
        "probe_steps_per_s": rate,
        "run_steps_per_s": lmforge_tokens_per_s(run) / tokens_per_step,
        "seconds_setup_included": elapsed,
        "fixed_seconds_from_probe": fixed,
        "val_nats_per_char": ours,
        "val_chars_per_token": len(val_text) / len(tokenizer.encode(val_text, add_special_tokens=False)),
        "margin": baseline - ours,
    }
    print(f"lmforge CPU recipe ({recipe}): {steps} steps in {elapsed:.0f} s (setup included), val {ours:.4f} "
          f"nats/char; margin {baseline - ours:+.4f} nats/char", flush=True)  # fmt: skip
    if args.race_out:
        Path(args.race_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-a", type=int, default=40)
    parser.add_argument("--steps-b", type=int, default=4)
    parser.add_argument("--race-seconds", type=float, default=180.0)
    parser.add_argument("--skip-race", action="store_true")
    parser.add_argument("--race-batch", type=int, default=32, help="lmforge's race recipe: sequences per step")
    parser.add_argument("--race-lr", type=float, default=3e-3, help="lmforge's race recipe: peak learning rate")
    parser.add_argument("--race-dtype", default="float32", help="lmforge's race recipe: float32 or bfloat16")
    parser.add_argument(
        "--race-shape", type=lambda v: [int(x) for x in v.split(",")], default=[4, 4, 128], help="layers,heads,width"
    )
    parser.add_argument("--race-compile", action="store_true", help="lmforge's race recipe: train.compile")
    parser.add_argument("--race-block", type=int, default=64, help="lmforge's race recipe: context length")
    parser.add_argument("--race-model", default="gpt", help="lmforge's race recipe: model family")
    parser.add_argument("--race-overrides", default="{}", help="lmforge's race recipe: model overrides (JSON)")
    parser.add_argument("--race-flag", action="append", default=[], help="lmforge's race recipe: section.key=value")
    parser.add_argument(
        "--race-margin", type=float, default=0.98, help="fraction of the probed budget the schedule is sized to"
    )
    parser.add_argument(
        "--race-baseline", type=float, default=None, help="skip the nanoGPT run and use this recorded loss"
    )
    parser.add_argument("--race-out", default=None, help="race results JSON")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per shape and dtype")
    parser.add_argument("--shapes", type=lambda v: v.split(","), default=["a", "b"])
    parser.add_argument("--dtypes", type=lambda v: v.split(","), default=["float32", "bfloat16"])
    parser.add_argument("--peers", type=lambda v: v.split(","), default=["nanogpt", "hf"])
    parser.add_argument("--same-process", action="store_true", help="throughput: time every contestant in this process")
    parser.add_argument("--lmforge-flag", action="append", default=[], help="section.key=value for lmforge's runs")
    parser.add_argument("--out", default=str(RESULTS / "pretrain_throughput.json"), help="throughput results JSON")
    args = parser.parse_args()
    text = DATA.read_text(encoding="utf-8")
    train_ids, _, vocab = nanogpt_split(text)
    # bf16 MFU against the rate bf16 training's products run at: bf16's, or fp32's on a CPU without bf16
    # products (lmforge computes them in fp32 there: lmforge.nn.precision; the emulation measures ~1 GFLOP/s)
    products = bf16_product_dtype(torch.device("cpu"))
    peaks = {"float32": measure_peak_flops(torch.float32)}
    peaks["bfloat16"] = peaks["float32"] if products == torch.float32 else measure_peak_flops(torch.bfloat16)
    print(
        f"{torch.get_num_threads()} threads; matmul peak {peaks['float32'] / 1e9:.0f} GFLOP/s fp32, "
        f"{peaks['bfloat16'] / 1e9:.0f} GFLOP/s bf16 (products in {str(products).removeprefix('torch.')})"
    )
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "train.txt").write_text(text[: int(len(text) * 0.9)], encoding="utf-8")
        if not args.skip_throughput:
            result = throughput(args, train_ids, len(vocab), out, peaks)
            result["peak_flops"] = peaks
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if not args.skip_race:
            race(args, text, out)


if __name__ == "__main__":
    main()
