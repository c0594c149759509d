"""LoRA: low-rank adapters on frozen Linear layers (Hu et al., 2021, arXiv:2106.09685).

A pretrained weight W (out x in) stays frozen; the layer learns a rank-r update instead:

    y = W x + b + (alpha / r) * B A dropout(x),      A: r x in,  B: out x r,  r << min(in, out)

A starts like an nn.Linear weight (kaiming-uniform with a = sqrt(5), as the paper's code and peft do) and
B starts at zero, so the wrapped model computes exactly what the base model computes until the first
update. Only r (in + out) numbers per layer train, instead of in * out; the alpha / r factor keeps the
update's size roughly independent of r, so a learning rate tuned at one rank carries to another.
After training, W + (alpha / r) B A folds into one matrix (`merge_lora`): inference costs nothing extra.

Targets use lmforge's module names (see nn/attention.py, nn/mlp.py): `qkv` (fused self-attention
projection), `q` / `kv` (cross-attention), `out` (attention output), `fc` / `proj` (plain MLP),
`gate` / `up` / `down` (gated MLP). A target matches a Linear whose name is it or ends with "." + it,
so "blocks.0.attn.qkv" picks one layer. One-word targets never reach into the task head (`classifier`,
`lm_head`), whose own Linear is also called `out`: the head is trained in full (`LoRAConfig.trainable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

HEAD_MODULES = ("lm_head", "classifier")  # models/heads.py: the output modules every family names so


@dataclass
class LoRAConfig:
    """r: rank of the update; alpha: its scale is alpha / r; dropout: on the adapter's input only.
    target_modules: Linear names to adapt (see the module docstring). trainable: modules trained in full
    next to the adapters; None means the model's task head (`classifier`) when it has one."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("qkv", "out")
    trainable: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA r={self.r!r} must be an integer >= 1 (8 or 16 are common)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a positive number (often 2 * r)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        self.target_modules = _names("target_modules", self.target_modules)
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name at least one Linear, e.g. ('qkv', 'out')")
        if self.trainable is not None:
            self.trainable = _names("trainable", self.trainable)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _names(field: str, value) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoRA {field}={value!r} must be a list of module names like ['qkv', 'out']")
    return names


class LoRALinear(nn.Module):
    """A frozen Linear `base` plus the low-rank update scaling * B A. `scaling` is alpha / r for the
    rank r the adapter was trained at (a stacked adapter, see peft_format.py, keeps it at a larger rank).
    Half-precision bases get float32 adapters, so small updates are not rounded away during training."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.scaling = scaling
        half = base.weight.dtype in (torch.float16, torch.bfloat16)
        kwargs = {"device": base.weight.device, "dtype": torch.float32 if half else base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kwargs)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kwargs)  # weight (out, r)
        self.drop = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def r(self) -> int:
        return self.lora_A.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = self.lora_B(self.lora_A(self.drop(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shaped like the base weight (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> nn.Linear:
        """The base Linear with the update folded in: W <- W + scaling * B A."""
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain Linear of the model by name (LoRA's own A and B excluded)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith((".lora_A", ".lora_B")):
            found[name.removesuffix(".base")] = module
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def matches(name: str, target: str) -> bool:
    """peft's rule: the name is the target or ends with "." + target."""
    return name == target or name.endswith("." + target)


def in_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_MODULES


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every target Linear in a `LoRALinear` (in place), freeze everything else except the modules
    in `config.trainable`, and return the wrapped names. The model's outputs are unchanged (B = 0)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first or use it as it is")
    trainable = trainable_modules(model, config.trainable)
    linears = linear_layers(model)
    wanted: set[str] = set()
    for target in config.target_modules:
        found = [
            name
            for name in linears
            if matches(name, target)
            and ("." in target or not in_head(name))
            and not any(matches_module(name, t) for t in trainable)
        ]
        if not found:
            known = sorted({name.rsplit(".", 1)[-1] for name in linears if not in_head(name)})
            raise ValueError(
                f"LoRA target {target!r} matches no Linear layer outside the trained head; "
                f"this model's Linear layers are named {known} (a dotted suffix such as 'blocks.0.attn.qkv' "
                f"picks one)"
            )
        wanted.update(found)
    chosen = [name for name in linears if name in wanted]  # in the model's order
    for name in chosen:
        replace_module(model, name, LoRALinear(linears[name], config.r, config.scaling, config.dropout))
    freeze_all_but_adapters(model, trainable)
    return chosen


def matches_module(name: str, module: str) -> bool:
    """Whether `name` is the module `module` or inside it."""
    return name == module or name.startswith(module + ".")


def trainable_modules(model: nn.Module, names: tuple[str, ...] | None) -> list[str]:
    """Full names of the modules to train in full: `names` matched like LoRA targets, or by default the
    task head `classifier` when the model has one."""
    modules = dict(model.named_modules())
    if names is None:
        return ["classifier"] if modules.get("classifier") is not None else []
    found = []
    for target in names:
        hits = [name for name in modules if name and matches(name, target)]
        if not hits:
            top = sorted(name for name in modules if name and "." not in name)
            raise ValueError(f"trainable module {target!r} is not in the model; its top-level modules are {top}")
        found += hits
    return found


def freeze_all_but_adapters(model: nn.Module, trainable: list[str]) -> None:
    """requires_grad only on LoRA's A and B and on the parameters of the `trainable` modules."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain Linear back (in place); returns the model.
    The merged model computes what the adapted one did, with no LoRA modules left."""
    for name, layer in lora_layers(model).items():
        replace_module(model, name, layer.merge())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed: every adapter's A and B and every other trainable parameter (the head),
    under the model's own names. Small enough to save at each checkpoint."""
    adapters = {name for layer_name in lora_layers(model) for name in (f"{layer_name}.lora_A", f"{layer_name}.lora_B")}
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if p.requires_grad or name.rsplit(".", 1)[0] in adapters
    }


def count_trainable(model: nn.Module) -> int:
    """Number of trainable numbers (a tied parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
