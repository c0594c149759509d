"""Freezing the bottom of a pretrained model, and layer-wise learning-rate decay.

Lower layers of a pretrained Transformer hold general features (token identity, syntax) that a small
task dataset should change least; upper layers and the new head need to move most. Two ways to say so:

- freeze: the embeddings and/or the first n layers get no gradient at all (and no optimizer state).
- layer-wise learning-rate decay (Clark et al., 2020, ELECTRA, section on fine-tuning; Bao et al., 2021,
  BEiT): with L layers numbered 0 (next to the input) to L - 1 and a decay factor 0 < d <= 1,
      lr(head)      = base_lr                    (everything above the last layer: final norm, pooler, head)
      lr(layer i)   = base_lr * d^(L - i)
      lr(embedding) = base_lr * d^(L + 1)
  so each step down the stack multiplies the learning rate by d (ELECTRA uses d = 0.8 for Base).

A layer is one `lmforge.nn.Block`; an encoder-decoder model's encoder layers come first, then its decoder
layers, as one stack of L. Embeddings are the nn.Embedding tables (a tied output layer is the token
embedding, so it goes with them) plus whatever sits before the first layer (BERT's embedding LayerNorm).
"""

from __future__ import annotations

from torch import nn

from lmforge.nn.block import Block
from lmforge.train.distributed import unwrap_model
from lmforge.train.optim import parameter_roles


def layer_names(model: nn.Module) -> list[str]:
    """Module names of the model's Transformer layers, from the input up."""
    return [name for name, module in model.named_modules() if isinstance(module, Block)]


def parameter_depths(model: nn.Module) -> dict[str, int]:
    """Each distinct parameter's first name -> its depth: 0 for embeddings, i + 1 for layer i, L + 1 above."""
    layers = layer_names(model)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    depths, below_layers = {}, True
    for name, p in model.named_parameters():
        layer = next((i for i, prefix in enumerate(layers) if name.startswith(prefix + ".")), None)
        if layer is not None:
            below_layers = False
            depths[name] = layer + 1
        elif id(p) in embedding_ids or below_layers:
            depths[name] = 0
        else:
            depths[name] = len(layers) + 1
    return depths


def freeze(model: nn.Module, *, embeddings: bool = False, first_n_layers: int = 0) -> int:
    """Stop gradients to the embeddings (when `embeddings`) and to layers 0 .. first_n_layers - 1.
    Returns how many numbers are frozen that way (a tied parameter counted once). Freezing the embeddings
    of a model whose output layer is tied to them freezes that output layer too."""
    model = unwrap_model(model)
    n_layers = len(layer_names(model))
    if isinstance(first_n_layers, bool) or not isinstance(first_n_layers, int) or first_n_layers < 0:
        raise ValueError(f"first_n_layers={first_n_layers!r} must be a whole number of layers >= 0")
    if first_n_layers > n_layers:
        raise ValueError(f"first_n_layers={first_n_layers} exceeds the model's {n_layers} layers; choose 0..{n_layers}")
    frozen = 0
    for name, depth in parameter_depths(model).items():
        if (embeddings and depth == 0) or 1 <= depth <= first_n_layers:
            p = model.get_parameter(name)
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def layerwise_lr_groups(model: nn.Module, base_lr: float, decay: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning-rate decay (see the module docstring), bottom up.
    Trainable parameters only. Weight decay goes to Linear weights; norms, biases and embeddings get none
    (`lmforge.train.optim.parameter_roles`). Each group records `role`, e.g. "layer_3/decay"."""
    if not isinstance(base_lr, (int, float)) or base_lr <= 0:
        raise ValueError(f"base_lr={base_lr!r} must be a positive number")
    if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"decay={decay!r} must be in (0, 1]; 1 gives every layer the same learning rate")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be a number >= 0")
    model = unwrap_model(model)
    top = len(layer_names(model)) + 1
    depths = parameter_depths(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, role in parameter_roles(model).items():
        depth, decayed = depths[name], role in ("matrix", "head")
        if (depth, decayed) not in groups:
            part = "embeddings" if depth == 0 else "head" if depth == top else f"layer_{depth - 1}"
            groups[depth, decayed] = {
                "params": [],
                "lr": base_lr * decay ** (top - depth),
                "weight_decay": weight_decay if decayed else 0.0,
                "role": f"{part}/{'decay' if decayed else 'no_decay'}",
            }
        groups[depth, decayed]["params"].append(model.get_parameter(name))
    return [groups[key] for key in sorted(groups)]
