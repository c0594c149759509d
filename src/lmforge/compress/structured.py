"""Structured pruning: remove whole attention heads or FFN channels, and build the genuinely smaller model.

A unit (one attention head, one FFN hidden channel) writes into the residual stream through its slice of the
output projection: head h adds o_h W_out[:, h]^T (o_h its d_head outputs), channel j adds h_j W_down[:, j]^T.
Units are chosen by one of three criteria (`IMPORTANCES`, `--importance`; `lmforge prune` takes reconstruction,
`remove_units` activation unless told):

- activation: the norm of that contribution over calibration tokens,

    I_u = ( sum_t || x_t[cols_u] W[:, cols_u]^T ||^2 )^(1/2)      (for a channel: ||h_j||_2 * ||W_down[:, j]||_2)

  the activation-norm criterion of structured pruning (e.g. Michel et al. 2019 score heads by how much the output
  changes without them; the norm of the contribution is its first-order-free, data-driven proxy, as in the
  activation-based channel pruning of Hu et al. 2016 weighted by the outgoing weights);

- taylor: the first-order Taylor estimate of the loss change when the unit goes (Molchanov et al. 2019),

    I_u = sum_batches | sum_{o, c in cols_u} W[o, c] dL/dW[o, c] |

  with L the mean next-token cross-entropy of a batch of calibration windows. Removing the unit zeroes its columns
  of the output projection, a step of -W[:, cols_u], so to first order L changes by -sum W dL/dW over them. The
  sum is also the gradient of a gate g_u = 1 on the unit's output activations a_u (Molchanov's formulation): with
  y_t = W a_t, dL/dW[o, c] = sum_t dL/dy_t[o] a_t[c], hence sum_{o, c} W[o, c] dL/dW[o, c] =
  sum_t sum_c a_t[c] dL/da_t[c] = dL/dg_u (tested). The absolute value is taken per batch and summed over batches,
  as Molchanov et al. average per-batch scores: gradients of different batches would otherwise partly cancel.

- reconstruction: the structured optimal brain surgeon on the output projection W (Kurtic et al. 2023, ZipLM;
  the column-group form of Frantar & Alistarh's OBS update that `prune.SparseGPT` applies weight by weight).
  With H = (2/n) X X^T the Hessian of the layer's squared output error over its calibration inputs X (dampened
  by 1% of its mean diagonal, as SparseGPT; X gains a row of ones when the layer has a bias, so the bias is
  re-fitted too), removing unit u's columns S and re-fitting the others by least squares raises the error by

    dE_u = 1/2 tr( W_S ([H^-1]_SS)^-1 W_S^T )

  and the re-fit is W <- W - W_S ([H^-1]_SS)^-1 [H^-1]_S,: , after which H^-1 <- H^-1 - [H^-1]_:,S
  ([H^-1]_SS)^-1 [H^-1]_S,: is the inverse Hessian of the units left. Units go one at a time, each the one of
  least dE_u, so the kept columns end as the least-squares fit of W X on the kept inputs (tested against
  torch.linalg.lstsq). Unlike the two scores above it changes the weights that stay, and it works block by
  block: each block's X comes from the blocks already pruned (the sequential calibration of `prune`).

Every layer loses the same number of units, so the pruned model has a uniform config (fewer heads, or a smaller
d_ff) that every lmforge loader and the Hugging Face exporters read as an ordinary model.

Removing a unit is exact: its rows of the input projections and its columns of the output projection go
(query rows for a head; q/k/v rows when each head has its own key/value head), so the smaller model computes
what the original computes with those units' outputs zeroed (tested). With grouped-query attention each
key/value head keeps serving the same number of query heads: the same count is removed from every group.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.prune import (
    SPARSEGPT_DAMPENING,
    InputStatistics,
    Refinement,
    block_inputs,
    calibrate,
    next_in_stack,
    refine_model,
)
from lmforge.nn import Block


@dataclass
class Removal:
    """What one structured pruning removed: per block, the units kept (sorted), and the new config."""

    kind: str
    amount: float
    kept: dict[str, list[int]]
    config: object


class UnitKind(ABC):
    """One kind of unit (heads or FFN channels): where its contribution is measured and how it is cut out."""

    name: ClassVar[str]

    @abstractmethod
    def check(self, model: nn.Module, amount: float) -> int:
        """Units removed per layer for `amount`, or a ValueError naming why the model or amount cannot be used."""

    @abstractmethod
    def output_layer(self, block: Block) -> nn.Linear:
        """The Linear whose input columns are the units' outputs (attention out, FFN down/proj)."""

    @abstractmethod
    def width(self, block: Block) -> int:
        """Columns per unit in `output_layer`'s input (d_head, or 1 for a channel)."""

    @abstractmethod
    def choose(self, block: Block, scores: torch.Tensor, remove: int) -> list[int]:
        """The units kept, sorted, given one score per unit."""

    def groups(self, block: Block) -> list[list[int]]:
        """The units in groups that each lose the same number (every unit in one group by default)."""
        return [list(range(self.output_layer(block).in_features // self.width(block)))]

    @abstractmethod
    def cut(self, block: Block, kept: list[int]) -> None:
        """Replace the block's Linears by their slices for the `kept` units (in place)."""

    @abstractmethod
    def new_config(self, config, kept_per_layer: int):
        """The config of the smaller model."""


def rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A Linear holding `linear`'s output rows `index`."""
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None, device=linear.weight.device)
    new = new.to(linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    return new


def columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A Linear holding `linear`'s input columns `index` (the bias is the output's and stays)."""
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
    new = new.to(linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


class Heads(UnitKind):
    name = "heads"

    def check(self, model: nn.Module, amount: float) -> int:
        config = model.config
        if not hasattr(config, "head_dim") or any(b.cross_attn is not None for b in blocks(model).values()):
            raise ValueError(
                f"--structured heads needs a decoder- or encoder-only model whose config sets head_dim (the llama "
                f"family: Llama, SmolLM2, Qwen, Mistral); {config.family} cannot say fewer heads of the same width: "
                "use --structured ffn"
            )
        n_head, n_kv = config.n_head, config.n_kv_heads or config.n_head
        group = n_head // n_kv
        per = group if group > 1 else n_head  # units that may be removed together: a GQA group, or all heads
        remove = round(amount * per)
        if remove >= per:
            raise ValueError(
                f"--amount {amount} would remove every head of a layer ({remove} of {per}"
                f"{' query heads per key/value group' if group > 1 else ' heads'}); choose a smaller amount"
            )
        if remove == 0:
            raise ValueError(f"--amount {amount} removes no head ({per} per group); choose at least {1 / per:.3g}")
        return remove

    def output_layer(self, block: Block) -> nn.Linear:
        return block.attn.out

    def width(self, block: Block) -> int:
        return block.attn.head_dim

    def choose(self, block: Block, scores: torch.Tensor, remove: int) -> list[int]:
        attn = block.attn
        group = attn.n_head // attn.n_kv_heads
        if group == 1:  # each head has its own key/value head: any heads may go
            return sorted(scores.topk(attn.n_head - remove).indices.tolist())
        kept = []
        for g in range(attn.n_kv_heads):  # the same number from every group, so each K/V head serves as many
            local = scores[g * group : (g + 1) * group].topk(group - remove).indices
            kept += (local + g * group).tolist()
        return sorted(kept)

    def groups(self, block: Block) -> list[list[int]]:
        attn = block.attn
        group = attn.n_head // attn.n_kv_heads
        if group == 1:
            return [list(range(attn.n_head))]
        return [list(range(g * group, (g + 1) * group)) for g in range(attn.n_kv_heads)]

    def cut(self, block: Block, kept: list[int]) -> None:
        attn = block.attn
        d, q_dim, kv_dim = attn.head_dim, attn.n_head * attn.head_dim, attn.n_kv_heads * attn.head_dim
        head_cols = torch.tensor([h * d + i for h in kept for i in range(d)], device=attn.out.weight.device)
        if attn.n_kv_heads == attn.n_head:  # multi-head attention: the heads' own keys and values go too
            index = torch.cat([head_cols, head_cols + q_dim, head_cols + q_dim + kv_dim])
            attn.n_kv_heads = len(kept)
        else:
            index = torch.cat([head_cols, torch.arange(q_dim, q_dim + 2 * kv_dim, device=head_cols.device)])
        attn.qkv = rows(attn.qkv, index)
        attn.out = columns(attn.out, head_cols)
        attn.n_head = len(kept)

    def new_config(self, config, kept_per_layer: int):
        n_kv = config.n_kv_heads
        if n_kv is not None and n_kv == config.n_head:
            n_kv = kept_per_layer
        head_dim = config.head_dim or config.d_model // config.n_head
        return config.replace(n_head=kept_per_layer, n_kv_heads=n_kv, head_dim=head_dim)


class FFNChannels(UnitKind):
    name = "ffn"

    def check(self, model: nn.Module, amount: float) -> int:
        d_ff = self.output_layer(next(iter(blocks(model).values()))).in_features
        remove = round(amount * d_ff)
        if remove >= d_ff:
            raise ValueError(f"--amount {amount} would remove every FFN channel of a layer; choose a smaller amount")
        if remove == 0:
            raise ValueError(f"--amount {amount} removes no FFN channel (d_ff={d_ff}); choose a larger amount")
        return remove

    def output_layer(self, block: Block) -> nn.Linear:
        ffn = block.ffn
        return ffn.down if hasattr(ffn, "down") else ffn.proj

    def width(self, block: Block) -> int:
        return 1

    def choose(self, block: Block, scores: torch.Tensor, remove: int) -> list[int]:
        return sorted(scores.topk(len(scores) - remove).indices.tolist())

    def cut(self, block: Block, kept: list[int]) -> None:
        ffn = block.ffn
        index = torch.tensor(kept, device=self.output_layer(block).weight.device)
        if hasattr(ffn, "down"):  # gated: W_down (act(W_gate x) * W_up x)
            ffn.gate, ffn.up, ffn.down = rows(ffn.gate, index), rows(ffn.up, index), columns(ffn.down, index)
        else:
            ffn.fc, ffn.proj = rows(ffn.fc, index), columns(ffn.proj, index)

    def new_config(self, config, kept_per_layer: int):
        return config.replace(d_ff=kept_per_layer)


UNIT_KINDS: dict[str, UnitKind] = {kind.name: kind for kind in (Heads(), FFNChannels())}


def blocks(model: nn.Module) -> dict[str, Block]:
    return {name: module for name, module in model.named_modules() if isinstance(module, Block)}


class Importance(ABC):
    """One criterion for scoring units on calibration batches (see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def scores(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block name -> one score per unit (higher: more important)."""

    def remove(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor], remove: int) -> dict[str, list]:
        """Cut `remove` units of every layer (of every group), in place; returns block name -> units kept. By
        default: score every unit on the model as it is, then cut the lowest scored."""
        scores = self.scores(model, kind, batches)
        kept = {}
        for name, block in blocks(model).items():
            kept[name] = kind.choose(block, scores[name], remove)
            kind.cut(block, kept[name])
        return kept


class ActivationNorm(Importance):
    name = "activation"

    def scores(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """I_u = the norm of the unit's contribution, from one forward pass over the calibration batches."""
        found = blocks(model)
        squares = {name: torch.zeros(kind.output_layer(b).in_features // kind.width(b)) for name, b in found.items()}

        def hook(name: str, block: Block):
            layer, width = kind.output_layer(block), kind.width(block)

            def add(_module, args, _output):
                x = args[0].detach().float().reshape(-1, layer.in_features // width, width)  # (tokens, units, width)
                w = layer.weight.detach().float().reshape(layer.out_features, -1, width)  # (out, units, width)
                if width == 1:  # a channel: ||h_j w_j^T||_F^2 = ||h_j||^2 ||w_j||^2
                    squares[name] += (x.square().sum(0) * w.square().sum(0)).squeeze(-1).cpu()
                else:  # a head: ||o_h W_h^T||_F^2, o_h (tokens, d_head)
                    squares[name] += torch.einsum("tuw,ouw->tuo", x, w).square().sum((0, 2)).cpu()

            return layer.register_forward_hook(add)

        calibrate(model, batches, [hook(name, block) for name, block in found.items()])
        return {name: s.sqrt() for name, s in squares.items()}


class Taylor(Importance):
    name = "taylor"

    def scores(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """I_u = sum over batches of |sum of W * dL/dW over the unit's output-projection columns|, L the batch's mean
        next-token cross-entropy. Only the output projections' weights take gradients (the others are frozen for
        the backward pass and given back their requires_grad flags after)."""
        head = getattr(model.config, "head", "")
        if head != "causal_lm":
            raise ValueError(
                f"--importance taylor scores units by the gradient of the next-token loss on the calibration text, "
                f"which needs a causal LM; this model has a {head or 'bare'} head: use --importance activation"
            )
        found = blocks(model)
        layers = {name: kind.output_layer(block) for name, block in found.items()}
        units = {name: layer.in_features // kind.width(found[name]) for name, layer in layers.items()}
        totals = {name: torch.zeros(n) for name, n in units.items()}
        flags = {p: p.requires_grad for p in model.parameters()}
        device = next(model.parameters()).device
        try:
            for p in flags:
                p.requires_grad_(False)
            weights = [layer.weight.requires_grad_(True) for layer in layers.values()]
            for ids in batches:
                ids = ids.to(device)
                logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T - 1, V): position t predicts t + 1
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                grads = torch.autograd.grad(loss, weights)
                for (name, layer), grad in zip(layers.items(), grads, strict=True):
                    products = (layer.weight.detach().float() * grad.float()).reshape(
                        layer.out_features, units[name], -1
                    )
                    totals[name] += products.sum((0, 2)).abs().cpu()
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return totals


class Reconstruction(Importance):
    name = "reconstruction"

    def scores(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """I_u = dE_u, the rise of the output projection's squared error if u alone went and the rest were
        re-fitted, every layer measured on the unpruned model in one pass."""
        found = blocks(model)
        grams = {name: gram(kind.output_layer(block)) for name, block in found.items()}
        calibrate(model, batches, [hook for _, hook in grams.values()])
        scores = {}
        for name, block in found.items():
            weight = augmented_weight(kind.output_layer(block)).double()
            width = kind.width(block)
            units = kind.output_layer(block).in_features // width
            scores[name] = removal_errors(weight, damped_inverse(grams[name][0].hessian), width, units)
        return {name: s.float() for name, s in scores.items()}

    def remove(self, model: nn.Module, kind: UnitKind, batches: list[torch.Tensor], remove: int) -> dict[str, list]:
        """Block by block: H from the block's inputs as the blocks before it left them, the greedy OBS removal
        with its re-fit of the output projection, the cut, then the block's outputs for the next block."""
        found = blocks(model)
        tokens = sum(ids.numel() for ids in batches)
        needed = max(kind.output_layer(block).in_features for block in found.values())
        if tokens < needed:  # H would be singular: the re-fit would reproduce the calibration tokens alone
            raise ValueError(
                f"--importance reconstruction re-fits each layer's {needed} inputs on the calibration tokens, and "
                f"{tokens} are fewer: pass more (--samples x --seq-len >= {needed}; several times more is better)"
            )
        kept: dict[str, list[int]] = {}
        inputs, inputs_of = None, None
        for name, block in found.items():
            if inputs_of != name:  # the first block of a stack: stop a forward pass there
                inputs = block_inputs(model, block, batches)
            layer = kind.output_layer(block)
            stats, hook = gram(layer)
            try:
                with torch.no_grad():
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
            finally:
                hook.remove()
            weight, kept[name] = obs_remove(
                augmented_weight(layer), stats.hessian, kind.groups(block), kind.width(block), remove
            )
            with torch.no_grad():
                layer.weight.copy_(weight[:, : layer.in_features])
                if layer.bias is not None:
                    layer.bias.copy_(weight[:, layer.in_features])
            kind.cut(block, kept[name])
            following = next_in_stack(name)
            if following in found:
                with torch.no_grad():
                    inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
                inputs_of = following
        return kept


def gram(layer: nn.Linear) -> tuple[InputStatistics, torch.utils.hooks.RemovableHandle]:
    """H = (2/n) sum_t x_t x_t^T over what `layer` receives (x with a trailing 1 when it has a bias), filled by
    the forward hook returned with it."""
    stats = InputStatistics(layer.in_features, True, layer.weight.device, constant=layer.bias is not None)
    return stats, layer.register_forward_hook(lambda _m, args, _out: stats.add(args[0]))


def augmented_weight(layer: nn.Linear) -> torch.Tensor:
    """[W | b]: the bias as the weight of a constant input 1 (W alone without a bias)."""
    weight = layer.weight.detach()
    return torch.cat([weight, layer.bias.detach()[:, None]], dim=1) if layer.bias is not None else weight.clone()


def damped_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """(H + lambda I)^-1 with lambda = 1% of H's mean diagonal (SparseGPT's dampening), in float64."""
    h = hessian.double().clone()
    mean = float(h.diagonal().mean())
    h.diagonal().add_(SPARSEGPT_DAMPENING * mean if mean > 0 else 1.0)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def removal_errors(weight: torch.Tensor, inverse: torch.Tensor, width: int, units: int) -> torch.Tensor:
    """dE_u = 1/2 tr(W_S ([H^-1]_SS)^-1 W_S^T) for each of the first `units` units of `width` columns (a bias
    column, if any, is past them and never one of them)."""
    if width == 1:  # a channel: w_j^T w_j / [H^-1]_jj, without batched 1 x 1 inverses
        return 0.5 * weight[:, :units].square().sum(0) / inverse.diagonal()[:units]
    index = torch.arange(units * width, device=weight.device).view(units, width)
    blocks_ = inverse[index[:, :, None], index[:, None, :]]  # (units, width, width)
    w = weight[:, index]  # (out, units, width)
    return 0.5 * torch.einsum("oui,uij,ouj->u", w, torch.linalg.inv(blocks_), w)


def obs_remove(
    weight: torch.Tensor, hessian: torch.Tensor, groups: list[list[int]], width: int, remove: int
) -> tuple[torch.Tensor, list[int]]:
    """Remove `remove` units of `width` columns from every group of `groups`, one at a time, each the unit of
    least dE_u among the groups with removals left, re-fitting the other columns after each (module docstring).
    Returns the re-fitted weight (the removed columns zero; same dtype) and the kept units, sorted."""
    w = weight.double().clone()
    inverse = damped_inverse(hessian)
    units = sum(len(g) for g in groups)
    group_of = torch.empty(units, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    left = torch.full((len(groups),), remove)
    alive = torch.ones(units, dtype=torch.bool)
    for _ in range(remove * len(groups)):
        errors = removal_errors(w, inverse, width, units)
        errors = errors.cpu().masked_fill(~alive | (left[group_of] == 0), float("inf"))
        u = int(errors.argmin())
        cols = torch.arange(u * width, (u + 1) * width, device=w.device)
        pivot = torch.linalg.inv(inverse[cols[:, None], cols[None, :]])  # ([H^-1]_SS)^-1
        row = pivot @ inverse[cols, :]  # (width, n)
        w.addmm_(w[:, cols], row, alpha=-1)  # in place: H^-1 is n x n, and this runs once per unit removed
        inverse.addmm_(inverse[:, cols], row, alpha=-1)
        w[:, cols] = 0  # zero up to rounding already
        # the removed unit's rows and columns of H^-1 are now zero; a unit block keeps its (masked) error finite
        inverse[cols[:, None], cols[None, :]] = torch.eye(width, dtype=inverse.dtype, device=inverse.device)
        alive[u] = False
        left[group_of[u]] -= 1
    return w.to(weight.dtype), alive.nonzero().flatten().tolist()


IMPORTANCES: dict[str, Importance] = {i.name: i for i in (ActivationNorm(), Taylor(), Reconstruction())}


def weights_read_per_token(model: nn.Module) -> int:
    """Parameters a batch-1 decoding step reads: every one (a tied embedding once, as the output layer), less an
    untied input embedding, of which a step reads a single row. Where decoding streams its weights from memory
    (batch 1 on a CPU, or a GPU) the step's time is about proportional to it, so the ratio of two models' counts
    bounds the speed-up the smaller one can show in the same dtype: removing units from the blocks leaves the
    output layer, and at SmolLM2-135M's 49,152 x 576 tied embedding 25% of the FFN channels bound it at 1.17x."""
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    embedding = getattr(model, "tok_emb", None)
    head = getattr(model, "lm_head", None)
    tied = embedding is not None and head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    if embedding is not None and not tied:
        unique.pop(embedding.weight.data_ptr(), None)
    return sum(unique.values())


def remove_units(
    model: nn.Module,
    kind_name: str,
    amount: float,
    batches: list[torch.Tensor],
    importance: str = "activation",
    refine: Refinement | None = None,
) -> Removal:
    """Remove `amount` of every layer's heads or FFN channels (`kind_name`) from `model`, in place, the lowest
    scored by `importance` (`IMPORTANCES`) on `batches`; the model's config becomes the smaller one. `refine`:
    then train each smaller block's weights towards the unpruned block's outputs (`prune.refine_model`; the
    unpruned model is copied for it). Returns what was kept."""
    if kind_name not in UNIT_KINDS:
        raise ValueError(f"--structured {kind_name!r} is unknown; choose one of {', '.join(UNIT_KINDS)}")
    if importance not in IMPORTANCES:
        raise ValueError(f"--importance {importance!r} is unknown; choose one of {', '.join(IMPORTANCES)}")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise ValueError(f"--amount {amount!r} must be a fraction in (0, 1), e.g. 0.25")
    if not batches:
        raise ValueError(f"--structured {kind_name} scores units on calibration text: pass --calibration DATA")
    kind = UNIT_KINDS[kind_name]
    remove = kind.check(model, amount)
    model.eval()
    dense = copy.deepcopy(model) if refine is not None else None
    kept = IMPORTANCES[importance].remove(model, kind, batches, remove)
    model.config = kind.new_config(model.config, len(next(iter(kept.values()))))
    if dense is not None:
        refine_model(model, dense, batches, refine)
    return Removal(kind_name, amount, kept, model.config)
