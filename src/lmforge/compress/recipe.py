"""`prune_checkpoint`: load a model, prune it (weights, or whole heads / FFN channels), measure it, and write the
pruned folder in one atomic step.

    model (any name `lmforge.hf.resolve` accepts) + its tokenizer
    calibration text -> token ids -> random windows (the first 90% of the tokens) ... compress.prune
    dense and pruned perplexity on windows of the held-out last 10% (causal LMs)
    OUT/  config.json, model.safetensors (lmforge format), the tokenizer, sparsity.json, and task.json when
          the source was a fine-tuned model folder (so `lmforge evaluate OUT` scores it like the original)

sparsity.json records the method, the target, each pruned layer's fraction of zeros (or, structured, the units
each block kept, the new config and `decode_speedup_bound`: the weights a batch-1 decoding step reads before over
after, `structured.weights_read_per_token`), the parameter counts and the perplexities. Unstructured weights are stored
dense (zeros included): every loader reads them unchanged.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.compress.prune import METHODS, Refinement, Sparsity, calibration_batches, prune_model
from lmforge.compress.structured import remove_units, weights_read_per_token
from lmforge.hf.files import check_destination
from lmforge.io import atomic_folder, write_json_atomic
from lmforge.train.sparsity import SPARSITY_FILE, SparsityMasks

TASK_FILE = "task.json"  # a fine-tuned model's task record (lmforge.finetune.recipe), copied as it is
HELD_OUT = 0.1  # the last tenth of the calibration tokens scores perplexity, never calibrates


def record_text(record: Any) -> str:
    """The text of a catalog or file record: a string, or a labelled record's "text" (or "source")."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("text", "source", "sentence", "review"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"calibration record {str(record)[:60]!r} holds no text; give a text dataset or file")


def calibration_tokens(data: str, tokenizer: Any) -> torch.Tensor:
    """All the token ids of `data` (a catalog name, whose train split is used, or a text file/folder/glob),
    documents joined end to end (1-D, int64)."""
    from lmforge.data.corpora.catalog import load_dataset

    dataset = load_dataset(data)
    records = dataset["train"]
    ids: list[int] = []
    for record in records:
        ids += tokenizer.encode(record_text(record), add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, windows: int, batch_size: int = 8) -> float:
    """exp(mean next-token cross entropy) over up to `windows` consecutive, non-overlapping windows of `tokens`."""
    count = min(windows, len(tokens) // seq_len)
    if count == 0:
        raise ValueError(f"too little held-out text for perplexity: {len(tokens)} tokens < --seq-len {seq_len}")
    rows = tokens[: count * seq_len].view(count, seq_len)
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            ids = rows[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
            n += ids[:, 1:].numel()
    return math.exp(total / n)


def prune_checkpoint(
    model_name: str,
    out: str | Path,
    method: str = "magnitude",
    sparsity: float | None = None,
    pattern: str | None = None,
    structured: str | None = None,
    amount: float | None = None,
    calibration: str | None = None,
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    sequential: bool = True,
    importance: str | None = None,
    dense_targets: bool = False,
    refine_epochs: int | None = None,
    refine_lr: float = 3e-4,
) -> dict[str, Any]:
    """Prune `model_name` and write it to `out` (see the module docstring); returns what sparsity.json holds.
    Unstructured or N:M with `method` and `sparsity` or `pattern`; or, with `structured` ("heads" or "ffn"),
    remove that fraction (`amount`) of every layer's heads or FFN channels, the lowest scored by `importance`
    ("reconstruction", the default, which also re-fits the weights left; "activation" or "taylor":
    `compress.structured.IMPORTANCES`), which makes the model smaller.
    `sequential=False` calibrates every layer on the dense model in one pass; `dense_targets` fits each layer to
    the dense model's outputs; `refine_epochs` then trains each pruned block toward the dense block's outputs
    (`compress.prune.prune_model`)."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.load import load_model
    from lmforge.hf.resolve import resolve_model
    from lmforge.hf.save import save_model

    refine = None if refine_epochs is None else Refinement(refine_epochs, refine_lr)
    if structured is None:
        if importance is not None:
            raise ValueError(f"--importance {importance} scores whole units: it goes with --structured heads|ffn")
        target = Sparsity.parse(sparsity, pattern)
        if method not in METHODS:
            raise ValueError(f"--method {method!r} is unknown; choose one of {', '.join(METHODS)}")
        needs_text = METHODS[method].needs_calibration
        what = f"--method {method}"
    else:
        if sparsity is not None or pattern is not None:
            raise ValueError("--structured removes whole units by --amount; drop --sparsity/--pattern")
        if dense_targets:
            raise ValueError("--dense-targets goes with --method sparsegpt, not --structured")
        if amount is None:
            raise ValueError(f"--structured {structured} needs --amount A, the fraction of units removed (e.g. 0.25)")
        needs_text, what = True, f"--structured {structured}"
    if needs_text and calibration is None:
        raise ValueError(f"{what} needs calibration text: pass --calibration DATA (a catalog name or file)")
    out = Path(out)
    check_destination(out, overwrite)
    source = resolve_model(model_name, presets=False).path
    model = load_model(source)
    tokenizer = load_tokenizer(source) if calibration is not None or _has_tokenizer(source) else None

    batches, held_out = None, None
    if calibration is not None:
        tokens = calibration_tokens(calibration, tokenizer)
        split = int(len(tokens) * (1 - HELD_OUT))
        batches = calibration_batches(tokens[:split], samples, seq_len, seed=seed)
        held_out = tokens[split:]
    scored = model.config.head == "causal_lm" and held_out is not None
    record: dict[str, Any] = {"source": str(model_name), "parameters_before": _parameters(model)}
    if scored:
        record["dense_perplexity"] = perplexity(model, held_out, seq_len, samples)
    if structured is None:
        record.update(method=method, target=target.describe())
        if dense_targets:
            record["dense_targets"] = True
        if refine is not None:
            record["refine"] = {"epochs": refine.epochs, "lr": refine.lr}
        record["layers"] = prune_model(
            model, method, target, batches, progress, sequential=sequential, dense_targets=dense_targets, refine=refine
        )
        record["overall"] = SparsityMasks(model, list(record["layers"])).overall()
    else:
        importance = importance or "reconstruction"  # one-shot on SmolLM2: heads 1.20x dense vs 3.5-3.6x
        read_before = weights_read_per_token(model)
        removal = remove_units(model, structured, amount, batches, importance, refine=refine)
        record.update(structured=structured, amount=amount, importance=importance)
        record["decode_speedup_bound"] = read_before / weights_read_per_token(model)
        if refine is not None:
            record["refine"] = {"epochs": refine.epochs, "lr": refine.lr}
        record.update(kept=removal.kept, config=model.config.to_dict())
    record["parameters"] = _parameters(model)
    if scored:
        record["perplexity"] = perplexity(model, held_out, seq_len, samples)
        record["held_out_tokens"] = len(held_out)
    with atomic_folder(out) as tmp:
        save_model(model, tmp, tokenizer=tokenizer, overwrite=True)
        if (source / TASK_FILE).is_file():
            shutil.copyfile(source / TASK_FILE, tmp / TASK_FILE)
        write_json_atomic(tmp / SPARSITY_FILE, record)
    return record


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt"))


def read_sparsity(folder: str | Path) -> dict[str, Any]:
    """The sparsity.json of a pruned model folder."""
    return json.loads((Path(folder) / SPARSITY_FILE).read_text(encoding="utf-8"))
