"""Unstructured and N:M pruning of a model's linear layers: magnitude, Wanda and SparseGPT.

Every method zeroes weights of the Linear layers inside the Transformer blocks (attention q/k/v/out, the FFN);
embeddings, norms and task heads stay dense, as in the Wanda and SparseGPT papers. Two sparsity forms:

- unstructured at sparsity s: a fraction s of each layer's weights is zeroed;
- N:M semi-structured (`--pattern 2:4`): of every M consecutive weights along the input dimension of a row at
  most N are kept, the layout sparse tensor cores run (NVIDIA Ampere 2:4; Mishra et al. 2021).

The methods differ in the score that decides which weights go, and in what happens to the rest:

    magnitude   score |W_ij| over the whole layer; exactly `torch.nn.utils.prune.l1_unstructured`'s mask
                (Han et al. 2015), the kept weights unchanged
    wanda       score |W_ij| * ||X_j||_2, compared within each output row i (Sun et al. 2023, eq. 1: the
                input-feature norm over calibration tokens stands in for the diagonal of the Hessian);
                the kept weights unchanged
    sparsegpt   the layer-wise reconstruction min ||W X - W' X||_2^2 solved approximately by the optimal
                brain surgeon update (Frantar & Alistarh 2023, Algorithm 1): columns are pruned left to right
                with H = X X^T (dampened by 1% of its mean diagonal), the mask chosen per block of 128 columns
                by w^2 / [H^-1]_jj^2, and the error of each pruned column spread over the columns not yet
                visited through the Cholesky factor of H^-1 (lazy batched updates)

Wanda and SparseGPT read the inputs each layer sees on calibration text. The blocks are pruned in order, and
each block's statistics come from the outputs of the blocks already pruned (the "sequential" variant of both
papers), so a later layer is fitted to what the pruned earlier layers give it. As in both papers' reference
code, a block's inputs are kept in memory: the first block of a stack (`nn.ModuleList`) gets them from a
forward pass stopped at it, and block i + 1 of a stack gets block i's output after block i is pruned, with
the same mask, positions and encoder memory. Pruning L blocks thus runs each block twice over the
calibration set, where a forward pass per block would run L^2 / 2 blocks (`sequential=False` measures every
layer on the dense model in one pass instead).

Two further steps, each optional, pull the pruned model towards the dense one rather than each layer towards
itself; both keep the dense model's chain of block inputs beside the pruned chain:

    dense targets   (`--dense-targets`, sparsegpt) each layer is fitted to the dense model's outputs W D on its
                    own inputs D instead of to W X on the damaged inputs X (`dense_target_weight`), the layers
                    of a block in the order they run, so the attention's pruning is part of what the output
                    projection and the FFN then compensate (`prune_block_to_dense_targets`)
    refinement      (`--refine-epochs`, wanda or sparsegpt) each pruned block's kept weights are trained by Adam
                    to reproduce the dense model's block outputs on the calibration text, the mask fixed
                    (`refine_block`): the whole block sees its nonlinearities, which no layer-wise solve does
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lmforge.nn import Block

PATTERN = re.compile(r"^(\d+):(\d+)$")
SPARSEGPT_BLOCK = 128  # columns per lazy batch (Frantar & Alistarh 2023, section 3.4)
SPARSEGPT_DAMPENING = 0.01  # lambda = 1% of the mean diagonal of H (their reference implementation)


@dataclass(frozen=True)
class Sparsity:
    """What to remove: a fraction of each layer (`fraction`), or an N:M pattern (`n` kept of every `m`)."""

    fraction: float = 0.0
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, sparsity: float | None, pattern: str | None) -> Sparsity:
        """From `--sparsity S` or `--pattern N:M` (exactly one); errors name the flag and what is allowed."""
        if (sparsity is None) == (pattern is None):
            raise ValueError("give one of --sparsity S (a fraction in [0, 1)) or --pattern N:M (e.g. 2:4)")
        if pattern is not None:
            match = PATTERN.match(pattern.strip())
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(
                    f"--pattern {pattern!r} is not N:M with 0 < N < M (N weights kept of every M), e.g. 2:4 or 4:8"
                )
            n, m = int(match[1]), int(match[2])
            return cls(fraction=1 - n / m, n=n, m=m)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(f"--sparsity {sparsity!r} must be a fraction in [0, 1), e.g. 0.5")
        return cls(fraction=float(sparsity))

    @property
    def structured(self) -> bool:
        return self.m > 0

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"

    def check_width(self, name: str, in_features: int) -> None:
        if self.structured and in_features % self.m:
            raise ValueError(
                f"{name} has {in_features} input features, not a multiple of M={self.m}; choose a pattern whose "
                f"M divides every layer's width (e.g. 2:4)"
            )


def lowest_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Boolean mask, True where a weight is pruned: per row, the round(s * columns) lowest scores, or for N:M
    the M - N lowest of every M consecutive columns."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if sparsity.structured:
        groups = scores.reshape(rows, cols // sparsity.m, sparsity.m)
        lowest = groups.topk(sparsity.m - sparsity.n, dim=-1, largest=False).indices
        return mask.reshape_as(groups).scatter_(-1, lowest, True).reshape(rows, cols)
    k = round(sparsity.fraction * cols)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


class InputStatistics:
    """Running statistics of a Linear layer's inputs X (tokens x in_features) over calibration batches:
    the squared column norms sum_t x_tj^2 (Wanda) and, when `hessian`, H = (2 / n) sum_t x_t x_t^T
    (SparseGPT's Hessian of the squared reconstruction error), both in float32. `constant`: H is that of
    x_t with a trailing 1 (a layer's bias as the weight of a constant input, which structured pruning re-fits).
    `cross`: also K = (2 / n) sum_t d_t x_t^T, where d_t is what the layer receives for the same token in the
    dense model (`add(x, dense=d)`): the statistics of the dense-target objective (`dense_target_weight`)."""

    def __init__(
        self, in_features: int, hessian: bool, device: torch.device, constant: bool = False, cross: bool = False
    ) -> None:
        self.tokens = 0
        self.constant = constant
        self.squares = torch.zeros(in_features, device=device)
        n = in_features + constant
        self.hessian = torch.zeros(n, n, device=device) if hessian else None
        self.cross = torch.zeros(in_features, in_features, device=device) if cross else None

    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in_features)
        n = x.shape[0]
        self.squares += x.square().sum(0)
        if self.cross is not None:
            if dense is None:
                raise ValueError("these statistics pair each input with the dense model's: pass dense=")
            d = dense.detach().reshape(-1, dense.shape[-1]).float()
            self.cross *= self.tokens / (self.tokens + n)
            self.cross += (2 / (self.tokens + n)) * d.T @ x
        if self.hessian is not None:  # running mean of 2 x x^T, numerically steadier than one big sum
            if self.constant:
                x = torch.cat([x, x.new_ones(n, 1)], dim=1)
            self.hessian *= self.tokens / (self.tokens + n)
            self.hessian += (2 / (self.tokens + n)) * x.T @ x
        self.tokens += n

    @property
    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


def dense_target_weight(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """The weight W* whose outputs on the inputs X the layer gets now (the blocks below already pruned) come
    closest to the dense model's outputs W D on its own inputs D, token by token:

        W* = argmin_V ||W D - V X||^2 = W K H^-1,   K = D X^T, H = X X^T   (up to the same 2 / n)

    and since W D - W* X is orthogonal to the rows of X, ||W D - W' X||^2 = ||W D - W* X||^2 + ||(W* - W') X||^2
    for every W': pruning W* against H (SparseGPT) minimises the distance to the dense outputs, the error the
    pruned blocks below pass up included, instead of reproducing this layer's own output on the damaged inputs.
    (The asymmetric objective of GPTAQ, Li et al. 2025, there for quantisation.) Written as the correction
    W* = W + W (K - H) (H + lambda I)^-1, so that the dampening (SparseGPT's) touches only the correction and
    X = D gives W back exactly."""
    W = weight.detach().float()
    H = stats.hessian.to(W.device).clone()
    difference = stats.cross.to(W.device) - H
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H += SPARSEGPT_DAMPENING * H.diagonal().mean() * torch.eye(H.shape[0], device=W.device)
    correction = torch.cholesky_solve(difference.T @ W.T, torch.linalg.cholesky(H)).T  # W (K - H) H^-1
    return (W + correction).to(weight.dtype)


class PruneMethod(ABC):
    """One way to choose (and compensate for) the pruned weights of a Linear layer."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> torch.Tensor:
        """The pruned weight (out_features, in_features), the same shape and dtype, zeros where pruned."""


class Magnitude(PruneMethod):
    """Smallest |W| over the whole layer (unstructured: torch.nn.utils.prune's L1Unstructured), or within each
    group of M (N:M)."""

    name = "magnitude"
    needs_calibration = False

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> torch.Tensor:
        if sparsity.structured:
            return weight.masked_fill(lowest_mask(weight.abs(), sparsity), 0)
        keep = torch_prune.L1Unstructured(amount=sparsity.fraction).compute_mask(weight, torch.ones_like(weight))
        return weight * keep


class Wanda(PruneMethod):
    """S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2023, eq. 1), pruned per output row (their per-output comparison
    group, section 3) or per group of M."""

    name = "wanda"

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> torch.Tensor:
        scores = weight.abs().float() * stats.norms.to(weight.device)[None, :]
        return weight.masked_fill(lowest_mask(scores, sparsity), 0)


class SparseGPT(PruneMethod):
    """Frantar & Alistarh 2023, Algorithm 1, with adaptive mask selection per block of 128 columns."""

    name = "sparsegpt"
    needs_hessian = True

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> torch.Tensor:
        if stats.cross is not None:  # fit to the dense model's outputs (see dense_target_weight)
            weight = dense_target_weight(weight, stats)
        W = weight.detach().float().clone()  # (rows, cols)
        H = stats.hessian.to(W.device).clone()
        cols = W.shape[1]
        dead = H.diagonal() == 0  # inputs that were always zero: their weights cannot matter, prune them
        H[dead, dead] = 1
        W[:, dead] = 0
        H += SPARSEGPT_DAMPENING * H.diagonal().mean() * torch.eye(cols, device=W.device)
        # U, upper Cholesky factor of H^-1: row i of U holds the OBS update for column i given columns < i gone
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        for start in range(0, cols, SPARSEGPT_BLOCK):
            end = min(start + SPARSEGPT_BLOCK, cols)
            W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
            errors = torch.zeros_like(W1)
            d = U1.diagonal()
            if sparsity.structured:  # filled group by group below
                mask = torch.zeros_like(W1, dtype=torch.bool)
            else:
                mask = lowest_mask_block(W1.square() / d.square(), sparsity.fraction)
            for i in range(end - start):
                if sparsity.structured and i % sparsity.m == 0:  # choose this group's mask from the updated weights
                    group = W1[:, i : i + sparsity.m].square() / d[i : i + sparsity.m].square()
                    lowest = group.topk(sparsity.m - sparsity.n, dim=1, largest=False).indices
                    mask[:, i : i + sparsity.m].scatter_(1, lowest, True)
                pruned = mask[:, i].to(W1.dtype)
                error = W1[:, i] * pruned / d[i]  # (w - q) / [H^-1]_ii, q = w with the pruned entries zeroed
                W1[:, i:].addr_(error, U1[i, i:], alpha=-1)  # W1[:, i:] -= error outer U1[i, i:]
                W1[:, i] *= 1 - pruned  # exactly zero (the update leaves a rounding residue)
                errors[:, i] = error
            W[:, start:end] = W1
            W[:, end:] -= errors @ U[start:end, end:]
        return W.to(weight.dtype)


def lowest_mask_block(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True at the round(fraction * size) lowest scores of a whole block (SparseGPT's adaptive mask)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    k = round(fraction * scores.numel())
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(scores.shape)


METHODS: dict[str, PruneMethod] = {method.name: method for method in (Magnitude(), Wanda(), SparseGPT())}


def prunable_layers(model: nn.Module) -> dict[str, dict[str, nn.Linear]]:
    """block name -> {layer name: Linear} for the Linear layers inside each Transformer block, in the order the
    blocks run (encoder before decoder: their order in the model)."""
    blocks = {}
    for block_name, block in model.named_modules():
        if isinstance(block, Block):
            blocks[block_name] = {
                f"{block_name}.{name}": module
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear)
            }
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no Transformer blocks (lmforge.nn.Block) to prune")
    return blocks


class _BlockDone(Exception):
    """Raised by a hook once the measured block has run: the rest of the forward pass is not needed."""


def calibration_forward(model: nn.Module) -> Callable[[torch.Tensor], object]:
    """A forward call over token ids (B, T) for any head: encoder-decoders get the same ids on both sides."""
    if getattr(model.config, "head", "") == "seq2seq_lm" or hasattr(model, "decoder"):
        return lambda ids: model(input_ids=ids, decoder_input_ids=ids)
    return lambda ids: model(input_ids=ids)


def input_hooks(
    layers: dict[str, nn.Linear], hessian: bool, device: torch.device
) -> tuple[dict[str, InputStatistics], list[torch.utils.hooks.RemovableHandle]]:
    """Statistics of what each of `layers` receives, filled by the forward hooks returned with them."""
    stats = {name: InputStatistics(layer.in_features, hessian, device) for name, layer in layers.items()}
    hooks = [
        layer.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
        for name, layer in layers.items()
    ]
    return stats, hooks


def calibrate(model: nn.Module, batches: list[torch.Tensor], hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Run the model over the calibration batches (a hook may end a pass early with `_BlockDone`), then remove
    `hooks`."""
    forward = calibration_forward(model)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                with contextlib.suppress(_BlockDone):
                    forward(ids.to(device))
    finally:
        for hook in hooks:
            hook.remove()


def input_statistics(
    model: nn.Module, layers: dict[str, nn.Linear], batches: list[torch.Tensor], hessian: bool
) -> dict[str, InputStatistics]:
    """The inputs each of `layers` sees over `batches`, with the model as it is now (a whole forward pass)."""
    stats, hooks = input_hooks(layers, hessian, next(model.parameters()).device)
    calibrate(model, batches, hooks)
    return stats


def prune_model(
    model: nn.Module,
    method: str,
    sparsity: Sparsity,
    calibration: list[torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    sequential: bool = True,
    dense_targets: bool = False,
    refine: Refinement | None = None,
) -> dict[str, float]:
    """Prune `model`'s block Linears in place with `method` (a name in METHODS) to `sparsity`; `calibration`
    is a list of token-id batches (B, T), needed by wanda and sparsegpt. `sequential` calibrates each block on
    the output of the blocks already pruned (kept in memory: each block runs twice); False measures every layer
    on the dense model in one pass (the less accurate variant). `dense_targets` (sparsegpt, sequential): each
    layer is fitted to the dense model's outputs rather than to its own on the pruned inputs, the layers of a
    block in the order they run (`prune_block_to_dense_targets`). `refine` (wanda, sparsegpt; sequential): each
    block, once pruned, has its kept weights trained to reproduce the dense model's block outputs
    (`refine_block`). Both keep the dense model's chain of block inputs beside the pruned one.
    Returns {layer name: fraction of zero weights}."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    pruner = METHODS[method]
    if pruner.needs_calibration and not calibration:
        raise ValueError(f"--method {method} needs calibration text: pass --calibration DATA (a catalog name or file)")
    one_pass = " --one-pass" if not sequential else ""
    if dense_targets and not (pruner.needs_hessian and sequential):
        raise ValueError(
            f"--dense-targets re-fits the weights kept to the dense model's outputs, block by block: it goes with "
            f"--method sparsegpt without --one-pass (not --method {method}{one_pass})"
        )
    if refine is not None and not (pruner.needs_calibration and sequential):
        raise ValueError(
            f"--refine-epochs trains each pruned block on the calibration text, block by block: it goes with "
            f"--method wanda or sparsegpt without --one-pass (not --method {method}{one_pass})"
        )
    blocks = prunable_layers(model)
    for layers in blocks.values():
        for name, layer in layers.items():
            sparsity.check_width(name, layer.in_features)
    model.eval()
    every_layer = {name: layer for layers in blocks.values() for name, layer in layers.items()}
    dense_stats = None
    if pruner.needs_calibration and not sequential:
        dense_stats = input_statistics(model, every_layer, calibration, pruner.needs_hessian)
    achieved = {}
    inputs, inputs_of = None, None  # the calibration batches' arguments of block `inputs_of`
    dense_chain = dense_targets or refine is not None
    # the dense model's arguments of every stack's first block, caught before anything is pruned
    dense_first = stack_inputs(model, blocks, calibration) if dense_chain else {}
    dense_inputs = None  # the dense model's arguments of block `inputs_of`
    for block_name, layers in blocks.items():
        block = model.get_submodule(block_name)
        pruned_here = False
        if not pruner.needs_calibration:
            stats = dict.fromkeys(layers)
        elif dense_stats is not None:
            stats = dense_stats
        else:
            if inputs_of != block_name:  # the first block of a stack
                inputs = block_inputs(model, block, calibration)
                dense_inputs = dense_first.get(block_name)
            if dense_targets:
                dense_inputs = prune_block_to_dense_targets(
                    block_name, block, layers, inputs, dense_inputs, pruner, sparsity
                )
                pruned_here = True
            else:
                if dense_chain:  # the dense block's outputs, before it is pruned
                    with torch.no_grad():
                        dense_inputs = [((block(*a, **k), *a[1:]), k) for a, k in dense_inputs]
                stats = chained_statistics(block, layers, inputs, pruner.needs_hessian)
        if not pruned_here:
            for name, layer in layers.items():
                with torch.no_grad():
                    layer.weight.copy_(pruner.prune(layer.weight.data, stats[name], sparsity))
        if refine is not None:  # dense_inputs now holds this block's dense outputs
            refine_block(block, layers, inputs, [args[0] for args, _ in dense_inputs], refine)
        for name, layer in layers.items():
            achieved[name] = float((layer.weight == 0).float().mean())
        following = next_in_stack(block_name)
        if pruner.needs_calibration and dense_stats is None and following in blocks:
            with torch.no_grad():
                inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
            inputs_of = following
        if progress is not None:
            progress(block_name)
    return achieved


@dataclass(frozen=True)
class Refinement:
    """Block-wise reconstruction of a pruned block: `epochs` passes of Adam at `lr` over the calibration
    batches, one step a batch."""

    epochs: int
    lr: float = 3e-4

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--refine-epochs {self.epochs} must be at least 1 (leave it out for none)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--refine-lr {self.lr} must be a positive number")


def refine_block(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    inputs: list[tuple[tuple, dict]],
    targets: list[torch.Tensor],
    refine: Refinement,
) -> tuple[float, float]:
    """Train the weights `layers` kept (their zeros stay zero) so that `block` on the pruned model's `inputs`
    gives the dense model's block outputs `targets`:

        min over the kept W of  sum_batches ||block(x_p) - y_d||^2 / ||y_d||^2

    One layer at a time (SparseGPT, Wanda) cannot see the nonlinearities, the attention softmax and the
    residual stream between a block's layers, nor undo what the pruned blocks below pass up; the block as a
    whole can. (Block-wise reconstruction: BRECQ, Li et al. 2021, for quantisation; EBFT, Guo et al. 2024, for
    sparse LLMs.) Only the Linears' weights train; norms, biases and the mask stay. Returns the mean relative
    error of the first and of the last epoch."""
    weights = [layer.weight for layer in layers.values()]
    masks = [weight != 0 for weight in weights]
    trainable = {p: p.requires_grad for p in block.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=refine.lr)
    errors = []
    try:
        with torch.enable_grad():
            for _ in range(refine.epochs):
                total = 0.0
                for (args, kwargs), target in zip(inputs, targets, strict=True):
                    error = (block(*args, **kwargs) - target).square().sum() / target.square().sum()
                    optimizer.zero_grad(set_to_none=True)
                    error.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for weight, mask in zip(weights, masks, strict=True):
                            weight.mul_(mask)
                    total += float(error.detach())
                errors.append(total / len(inputs))
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    return errors[0], errors[-1]


def refine_model(
    model: nn.Module,
    dense: nn.Module,
    calibration: list[torch.Tensor],
    refine: Refinement,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Block-wise reconstruction (`refine_block`) of every block of `model`, a pruned or smaller copy of `dense`
    with the same block names, towards the same block of `dense`, in order: each block trained on what the
    refined blocks below it pass up, towards the dense block's output on the dense model's inputs."""
    blocks = prunable_layers(model)
    dense_first = stack_inputs(dense, blocks, calibration)
    inputs, inputs_of, dense_inputs = None, None, None
    for block_name, layers in blocks.items():
        block, dense_block = model.get_submodule(block_name), dense.get_submodule(block_name)
        if inputs_of != block_name:  # the first block of a stack
            inputs = block_inputs(model, block, calibration)
            dense_inputs = dense_first[block_name]
        with torch.no_grad():
            dense_inputs = [((dense_block(*a, **k), *a[1:]), k) for a, k in dense_inputs]
        refine_block(block, layers, inputs, [args[0] for args, _ in dense_inputs], refine)
        following = next_in_stack(block_name)
        if following in blocks:
            with torch.no_grad():
                inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
            inputs_of = following
        if progress is not None:
            progress(block_name)


def next_in_stack(block_name: str) -> str:
    """'decoder.blocks.3' -> 'decoder.blocks.4': the block of the same `nn.ModuleList` that reads this one's
    output in every family's forward pass (`x = block(x, ...)` in order)."""
    stack, _, index = block_name.rpartition(".")
    return f"{stack}.{int(index) + 1}" if index.isdigit() else ""


def block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) `block` is called with on each calibration batch, by a forward pass of the model as
    it is now that stops there."""
    caught: list[tuple[tuple, dict]] = []

    def keep(_module, args, kwargs):
        if not args:
            raise TypeError(f"{type(block).__name__} was called without a positional input: cannot chain blocks")
        caught.append((args, kwargs))
        raise _BlockDone

    calibrate(model, batches, [block.register_forward_pre_hook(keep, with_kwargs=True)])
    return caught


def chained_statistics(
    block: nn.Module, layers: dict[str, nn.Linear], inputs: list[tuple[tuple, dict]], hessian: bool
) -> dict[str, InputStatistics]:
    """The inputs each of `layers` (inside `block`) sees when `block` runs on `inputs`."""
    stats, hooks = input_hooks(layers, hessian, next(block.parameters()).device)
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                block(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def stack_inputs(
    model: nn.Module, blocks: dict[str, dict[str, nn.Linear]], batches: list[torch.Tensor]
) -> dict[str, list[tuple[tuple, dict]]]:
    """The (args, kwargs) the first block of every stack (`nn.ModuleList` of blocks) is called with on each
    calibration batch, by whole forward passes of the model as it is now (a decoder's encoder memory
    included)."""
    firsts = [name for name in blocks if not any(next_in_stack(other) == name for other in blocks)]
    caught: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in firsts}

    def keep(name: str) -> Callable:
        def hook(_module, args, kwargs):
            if not args:
                raise TypeError(f"{name} was called without a positional input: cannot chain blocks")
            caught[name].append((args, kwargs))

        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(keep(name), with_kwargs=True) for name in firsts]
    calibrate(model, batches, hooks)
    return caught


def layer_groups(block: nn.Module, layers: dict[str, nn.Linear], args: tuple, kwargs: dict) -> list[list[str]]:
    """`layers` in the order `block` calls them on (args, kwargs), those that read the same tensor together
    (q, k and v; an FFN's gate and up)."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(lambda _m, a, _o, name=name: calls.append((name, a[0])))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    groups: list[list[str]] = []
    last = None
    for name, tensor in calls:
        if any(name in group for group in groups):
            continue
        if groups and tensor is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = tensor
    missing = set(layers) - {name for group in groups for name in group}
    return groups + ([sorted(missing)] if missing else [])


def inputs_up_to(block: nn.Module, layers: dict[str, nn.Linear], args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """What each of `layers` receives when `block` runs on (args, kwargs), the block stopped once all have run."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable:
        def hook(_module, a, _out):
            seen.setdefault(name, a[0])
            if len(seen) == len(layers):
                raise _BlockDone

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad(), contextlib.suppress(_BlockDone):
            block(*args, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def prune_block_to_dense_targets(
    block_name: str,
    block: nn.Module,
    layers: dict[str, nn.Linear],
    inputs: list[tuple[tuple, dict]],
    dense_inputs: list[tuple[tuple, dict]],
    pruner: PruneMethod,
    sparsity: Sparsity,
) -> list[tuple[tuple, dict]]:
    """Prune `block`'s `layers` in the order they run, each group fitted (`dense_target_weight`) to what the
    dense block gives on the dense model's `dense_inputs`, its own inputs measured on the pruned model's
    `inputs` with the earlier groups of this block already pruned (so that q, k, v's pruning is part of what
    the output projection compensates). Returns the dense model's arguments of the next block."""
    dense_block = copy.deepcopy(block)
    dense_layers = {name: dense_block.get_submodule(name.removeprefix(f"{block_name}.")) for name in layers}
    device = next(block.parameters()).device
    for group in layer_groups(block, layers, *inputs[0]):
        stats = {name: InputStatistics(layers[name].in_features, True, device, cross=True) for name in group}
        mine = {name: layers[name] for name in group}
        theirs = {name: dense_layers[name] for name in group}
        for (args, kwargs), (dense_args, dense_kwargs) in zip(inputs, dense_inputs, strict=True):
            dense_seen = inputs_up_to(dense_block, theirs, dense_args, dense_kwargs)
            for name, x in inputs_up_to(block, mine, args, kwargs).items():
                stats[name].add(x, dense=dense_seen[name])
        for name in group:
            with torch.no_grad():
                layers[name].weight.copy_(pruner.prune(layers[name].weight.data, stats[name], sparsity))
    with torch.no_grad():
        return [((dense_block(*a, **k), *a[1:]), k) for a, k in dense_inputs]


def iter_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """`samples` windows of `seq_len` tokens drawn at random offsets of the 1-D `tokens` (as the Wanda and
    SparseGPT calibration sets are: random 2048-token segments of C4)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (samples,), generator=generator)
    for start in starts.tolist():
        yield tokens[start : start + seq_len]


def calibration_batches(
    tokens: torch.Tensor, samples: int, seq_len: int, batch_size: int = 8, seed: int = 0
) -> list[torch.Tensor]:
    """Random windows of `tokens` in batches (B, seq_len); too little text for one window is an error."""
    if samples < 1:
        raise ValueError(f"--samples {samples} must be at least 1")
    if len(tokens) < seq_len:
        raise ValueError(
            f"too little calibration data: {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text with --calibration or a smaller --seq-len"
        )
    windows = list(iter_windows(tokens, samples, seq_len, seed))
    return [torch.stack(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W X - W' X||_F / ||W X||_F over inputs X (tokens, in_features): what SparseGPT minimises."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    weight, pruned = weight.detach(), pruned.detach()
    dense = x @ weight.float().T
    return float((dense - x @ pruned.float().T).norm() / dense.norm().clamp(min=math.ulp(1.0)))
