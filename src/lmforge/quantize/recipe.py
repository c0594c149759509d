"""`quantize_model` and `quantize_checkpoint`: weight-only int8 / int4 quantisation of a model's blocks, by
round-to-nearest or GPTQ on calibration text.

What is quantised: every Linear inside the Transformer blocks (attention q/k/v and output, the MLP), the
layers that hold nearly all the weights a decoding step reads. The token embedding (a lookup) and the output
projection stay in floating point, as in the GPTQ paper's experiments (section 4): the output layer's errors
land directly on the logits.

GPTQ runs block by block, as the paper's reference implementation does: the calibration sequences' inputs
to the first block are captured once; for each block, hooks on its Linears accumulate H = 2 X X^T / n from
the inputs they see (`HessianAccumulator`), every Linear of the block is quantised with its H (`gptq.gptq`),
and the block's outputs computed with the quantised weights become the next block's inputs, so each block
corrects for the errors of the ones before it. Peak extra memory: the hidden states of the calibration set
(samples x seq_len x d_model floats) and one (in, in) Hessian per Linear of a block.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.quantize.gptq import HessianAccumulator, gptq, round_to_nearest
from lmforge.quantize.methods import METHODS

SIDE_FILES = ("task.json",)  # copied from the source folder: a fine-tuned model's task, for evaluate / predict


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the Linears inside `model.blocks`, in order."""
    if not hasattr(model, "blocks"):
        raise ValueError(f"{type(model).__name__} has no Transformer blocks to quantise")
    return [(f"blocks.{name}", m) for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


def make_method(method: str, group_size: int | None, grid: str | None = None, gptq: bool = False):
    """A fresh quantiser (it holds one layer's codes and grid) for --method; `gptq` picks its default grid."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not supported; choose one of {list(METHODS)}")
    return METHODS[method](group_size, grid=grid, gptq=gptq)


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int | None = None,
    calibration: list[torch.Tensor] | None = None,
    act_order: bool = True,
    grid: str | None = None,
) -> dict[str, Any]:
    """Quantise `model`'s block Linears in place: round-to-nearest, or GPTQ when `calibration` (a list of
    (1, T) token id tensors) is given, visiting inputs by decreasing Hessian diagonal unless `act_order` is
    False. `grid` (int4): "minmax" or "mse", None for the method's default (`lmforge.quantize.methods`).
    Returns the checkpoint's "quantization" entry."""
    gptq = calibration is not None

    def new():
        return make_method(method, group_size, grid, gptq)

    new()  # refuse a bad method, group size or grid first
    targets = target_linears(model)
    for name, linear in targets:
        new().check(name, linear)
    model.eval()
    if calibration is None:
        for name, linear in targets:
            quantizer = new()
            round_to_nearest(linear.weight, quantizer)
            replace(model, name, quantizer.module(linear))
    else:
        run_gptq(model, new, calibration, act_order)
    config = new().config()
    config.update(gptq=calibration is not None, modules=[name for name, _ in targets])
    if calibration is not None:
        config.update(samples=len(calibration), act_order=act_order)
    return config


class _Captured(Exception):
    """Raised by the first block's hook once it has the block's inputs: the rest of the forward is not needed."""


def block_inputs(model: nn.Module, calibration: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block is called with for each calibration sequence."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = model.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calibration:
            with contextlib.suppress(_Captured):
                model(ids)
    finally:
        handle.remove()
    return captured


def run_gptq(model: nn.Module, new_quantizer, calibration: list[torch.Tensor], act_order: bool) -> None:
    """GPTQ on every block in turn; see the module docstring. All Linears of a block take their Hessians from
    one pass of the block's (already-quantised-upstream) inputs. The reference implementation's "true
    sequential" option, which re-collects the inputs of the output projection and of the MLP after the
    earlier Linears of the same block are rounded, measured no better here (SmolLM2-135M, int4 g64 mse
    grid, act-order: perplexity 40.14 against 40.12) at 2.5x the time, so it is not used."""
    inputs = block_inputs(model, calibration)
    for block in model.blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        hessians = {n: HessianAccumulator(m.in_features) for n, m in linears}
        handles = [
            m.register_forward_pre_hook(lambda module, args, acc=hessians[n]: acc.add(args[0])) for n, m in linears
        ]
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        quantized = {}
        for name, linear in linears:
            quantizer = new_quantizer()
            dequantized = gptq(linear.weight, hessians[name].hessian, quantizer, act_order=act_order)
            with torch.no_grad():
                linear.weight.copy_(dequantized.to(linear.weight.dtype))
            quantized[name] = quantizer.module(linear)
        # The next block's inputs come from this block with its rounded weights, as GPTQ prescribes; run as
        # float Linears holding exactly the grid values: the same outputs as the quantised modules, without
        # the CPU int4 kernel, which is many times slower than a dense matmul at calibration's shapes.
        inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
        for name, module in quantized.items():
            replace(block, name, module)


def calibration_sequences(tokenizer, path: str | Path, samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens drawn at random (fixed `seed`) from the text file `path`, as GPTQ
    draws its 128 random 2048-token segments of C4 (section 4)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found; give a text file (--calibration FILE.txt)")
    if samples < 1 or seq_len < 2:
        raise ValueError(f"--samples {samples} and --seq-len {seq_len} must be at least 1 and 2")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    if len(ids) < seq_len:
        raise ValueError(
            f"calibration file {path} holds {len(ids)} tokens, fewer than --seq-len {seq_len}; give more text"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - seq_len + 1) for _ in range(samples)]
    return [torch.tensor([ids[s : s + seq_len]]) for s in starts]


def quantize_checkpoint(
    source: str | Path,
    out: str | Path,
    method: str,
    group_size: int | None = None,
    use_gptq: bool = False,
    calibration: str | Path | None = None,
    samples: int = 128,
    seq_len: int = 256,
    act_order: bool = True,
    grid: str | None = None,
    overwrite: bool = False,
) -> str:
    """Load `source` (any model `lmforge.hf.resolve` accepts but a preset), quantise it, save it to the folder
    `out` with its tokenizer; returns a one-line summary."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.files import check_destination
    from lmforge.hf.load import load_model
    from lmforge.hf.quantized import save_quantized
    from lmforge.hf.resolve import resolve_model

    make_method(method, group_size, grid, use_gptq)
    if use_gptq and calibration is None:
        raise ValueError("--gptq needs calibration text: add --calibration FILE.txt (e.g. a few hundred KB of text)")
    if not use_gptq and calibration is not None:
        raise ValueError("--calibration is only used by --gptq; add --gptq or drop --calibration")
    if calibration is not None and not Path(calibration).is_file():
        raise FileNotFoundError(f"calibration file {calibration} not found; give a text file (--calibration FILE.txt)")
    check_destination(Path(out), overwrite)
    path = resolve_model(source, presets=False).path
    model = load_model(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    sequences = calibration_sequences(tokenizer, calibration, samples, seq_len) if use_gptq else None
    config = quantize_model(model, method, group_size, sequences, act_order, grid)
    side_files = tuple(path / name for name in SIDE_FILES if (path / name).is_file())
    save_quantized(model, out, config, tokenizer=tokenizer, overwrite=overwrite, side_files=side_files)
    how = f"GPTQ on {samples} x {seq_len} tokens" if use_gptq else "round-to-nearest"
    if use_gptq and act_order:
        how += ", act-order"
    group = f", group {config['group_size']}, {config['grid']} grid" if "group_size" in config else ""
    return f"wrote {out}: {method}{group}, {how}, {len(config['modules'])} Linear layers quantised"
