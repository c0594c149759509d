"""Optimizers and learning-rate schedules for pretraining.

AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay on the weights of Linear layers only. Decay
pulls a matrix towards 0, which regularises the linear maps; it is not applied to
- norm gains and biases (1-D): shrinking a LayerNorm gain towards 0 only rescales activations, and
- embeddings (nn.Embedding weights, a tied output head included): each row is updated only when its token
  appears, so decay would erase rare tokens (nanoGPT and most LLM recipes do the same).

Muon (Jordan et al., 2024, "Muon: MomentUm Orthogonalized by Newton-Schulz") for 2-D hidden weights:
    m_t = mu m_{t-1} + (1 - mu) g_t                       (momentum buffer, an EMA of the gradient)
    u_t = (1 - mu) g_t + mu m_t                            (Nesterov: look one step ahead)
    O_t = NS5(u_t) ~= U V^T  where u_t = U S V^T           (the nearest semi-orthogonal matrix)
    W_t = (1 - lr wd) W_{t-1} - lr sqrt(max(1, rows/cols)) O_t
NS5 is five steps of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X with A = X X^T and
(a, b, c) = (3.4445, -4.7750, 2.0315), started from u / ||u||_F (so every singular value is <= 1). The
coefficients push small singular values up fast at the cost of landing in about [0.7, 1.2] instead of
exactly 1, which is what the update needs: every direction of the gradient moves by the same amount.
Embeddings, the output head and 1-D parameters keep AdamW (Muon's orthogonalisation suits hidden
matrices that map activations to activations, not lookups or logits), in the same optimizer object.

Schedules (`lr_at`): a linear warmup from 0 to `lr` over `warmup_steps` (as in transformers'
`get_*_schedule_with_warmup`: step 0 runs at lr 0 and step `warmup_steps` at the full lr), then
    cosine:    min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,  p = (step - warmup) / (max_steps - warmup)
    linear:    lr - (lr - min_lr) p
    wsd:       lr until the last `decay_fraction` of max_steps, then linear to min_lr (warmup-stable-decay,
               Hu et al., 2024, MiniCPM)
    constant:  lr
    exponential: min_lr (lr / min_lr)^p' with p' = (step - warmup) / (max_steps - 1 - warmup): from min_lr at the
               first step to lr at the last, the learning-rate range test's sweep (`lmforge lr-find`)
Past max_steps the rate stays at its final value. `step` counts optimizer updates already taken.

L1 regularisation (`l1` = lambda, Tibshirani 1996; Keras' `l1` kernel regulariser) adds lambda sum |w| over the
weights that get weight decay to the loss. It is applied as its subgradient, lambda sign(w) added to those
gradients before clipping (`add_l1_subgradient`), which is what backpropagating the penalty would add, without
a forward pass over every weight; the logged loss is the data loss alone. Unlike decay (which shrinks w in
proportion to its size) it pulls every weight towards 0 by the same amount, so small weights reach 0: sparsity.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.nn.precision import cpu_has_native_bf16
from lmforge.train.distributed import unwrap_model

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "wsd", "constant", "exponential")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
OUTPUT_MODULES = ("lm_head", "classifier")  # lmforge's head modules (models/heads.py): outputs, not hidden maps


@dataclass
class OptimConfig:
    """Optimizer and schedule settings. `lr`, `beta1`, `beta2`, `eps`, `weight_decay` are AdamW's (and
    the AdamW part of Muon); `muon_lr`, `muon_momentum` and `muon_ns_steps` (Newton-Schulz iterations per
    update) apply to the Muon part only."""

    name: str = "adamw"  # "adamw" | "muon" (Muon for 2-D hidden weights, AdamW for the rest)
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings (1-D params and nn.Embedding weights)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine" | "linear" | "wsd" | "constant" | "exponential"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying at the end
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    l1: float = 0.0  # L1 penalty l1 * sum|w| on the decayed weights (Linear weights), as a subgradient; 0: off
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = NS_STEPS

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name={self.name!r} is not supported; choose one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported; choose one of {list(SCHEDULES)}")
        _check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("min_lr", self.min_lr, 0.0, self.lr)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("beta1", self.beta1, 0.0, 1.0, high_open=True)
        _check_range("beta2", self.beta2, 0.0, 1.0, high_open=True)
        _check_range("eps", self.eps, 0.0, math.inf, low_open=True)
        _check_range("decay_fraction", self.decay_fraction, 0.0, 1.0)
        _check_range("grad_clip", self.grad_clip, 0.0, math.inf)
        _check_range("l1", self.l1, 0.0, math.inf)
        _check_range("muon_lr", self.muon_lr, 0.0, math.inf, low_open=True)
        _check_range("muon_momentum", self.muon_momentum, 0.0, 1.0, high_open=True)
        if self.schedule == "exponential" and not 0 < self.min_lr < self.lr:
            raise ValueError(f"schedule=exponential sweeps from min_lr to lr: it needs 0 < min_lr ({self.min_lr}) < lr")
        _check_integer("warmup_steps", self.warmup_steps, 0, "an integer >= 0")
        _check_integer("muon_ns_steps", self.muon_ns_steps, 1, "an integer from 1 to 20 (Newton-Schulz iterations)", 20)


def _check_range(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} must be a number in {interval}")


def _check_integer(name: str, value: Any, low: int, what: str, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{name}={value!r} must be {what}")


# ---------------------------------------------------------------- parameter groups


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each distinct trainable parameter's first name -> its role:
    "embedding" (an nn.Embedding weight, including an output head tied to it), "head" (a Linear weight
    inside the model's `lm_head` or `classifier`), "matrix" (any other Linear weight: the hidden matrices),
    "other" (norm gains, biases, everything else)."""
    model = unwrap_model(model)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head_ids, linear_ids = set(), set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear_ids.add(id(module.weight))
            if module_name.split(".")[0] in OUTPUT_MODULES:
                head_ids.add(id(module.weight))
    roles = {}
    for name, p in model.named_parameters():  # a tied Parameter appears once, under its first name
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            roles[name] = "embedding"
        elif id(p) in head_ids and p.ndim >= 2:
            roles[name] = "head"
        elif id(p) in linear_ids and p.ndim >= 2:
            roles[name] = "matrix"
        else:
            roles[name] = "other"
    return roles


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(unwrap_model(model).named_parameters())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with decay on Linear weights only (cfg.name="adamw"), or `Muon` for hidden Linear weights plus
    AdamW for embeddings, the output head and 1-D parameters (cfg.name="muon"). Each group records its
    `role`, so checkpoints and logs can tell them apart."""
    roles = parameter_roles(model)
    params = _named(model)
    by_role: dict[str, list[nn.Parameter]] = {"matrix": [], "head": [], "embedding": [], "other": []}
    for name, role in roles.items():
        by_role[role].append(params[name])
    betas = (cfg.beta1, cfg.beta2)
    adam_decay = by_role["head"] + (by_role["matrix"] if cfg.name == "adamw" else [])
    adam_no_decay = by_role["embedding"] + by_role["other"]
    groups: list[dict[str, Any]] = []  # AdamW groups first: param_groups[0]["lr"] is the schedule's lr
    for role, group_params, decay in (("decay", adam_decay, cfg.weight_decay), ("no_decay", adam_no_decay, 0.0)):
        if group_params:
            group = {"params": group_params, "role": role, "lr": cfg.lr, "weight_decay": decay}
            if cfg.name == "muon":
                group.update(use_muon=False, betas=betas, eps=cfg.eps)
            groups.append(group)
    if cfg.name == "muon" and by_role["matrix"]:
        groups.append(
            {"params": by_role["matrix"], "role": "muon", "use_muon": True, "lr": cfg.muon_lr,
             "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay}
        )  # fmt: skip
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False); nothing to optimize")
    if cfg.name == "muon":
        return Muon(
            groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, betas=betas, eps=cfg.eps, ns_steps=cfg.muon_ns_steps
        )
    # The fused kernel updates every tensor in one pass: on a small model the default per-tensor loop costs
    # ~5x more time per step (measured 2.7 ms vs 0.6 ms for a 4-layer, 128-wide GPT on 2 CPU cores).
    # Multi-tensor kernels cannot mix DTensors with plain tensors (tensor parallelism shards the blocks and keeps
    # norms and embeddings whole): such a model takes the per-tensor loop.
    params = [p for g in groups for p in g["params"]]
    mixed = len({isinstance(p, DTensor) for p in params}) > 1
    fused = not mixed and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None,
        foreach=False if mixed else None,
    )  # fmt: skip


def add_loss_groups(optimizer: torch.optim.Optimizer, module: nn.Module | None, cfg: OptimConfig) -> None:
    """Give the loss's own parameters (`Objective.loss_module`) to `optimizer`: groups "loss/decay" (its matrices,
    decayed like the model's Linear weights) and "loss/no_decay" (its biases and other 1-D parameters), with the
    AdamW options of the optimizer's first AdamW group (under Muon too: a small map trained beside the model needs
    no orthogonalised update) and the base lr. Call it before the scheduler is built, which records each group's
    base rate. Nothing for None or a module without trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    if not params:
        return
    template = next((g for g in optimizer.param_groups if not g.get("use_muon", False)), optimizer.param_groups[0])
    options = {k: v for k, v in template.items() if k not in ("params", "role", "initial_lr")}
    if "use_muon" in options:
        options.update(use_muon=False, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    for role, chosen, decay in (
        ("loss/decay", [p for p in params if p.ndim >= 2], cfg.weight_decay),
        ("loss/no_decay", [p for p in params if p.ndim < 2], 0.0),
    ):
        if chosen:
            optimizer.add_param_group({**options, "params": chosen, "role": role, "lr": cfg.lr, "weight_decay": decay})


def add_l1_subgradient(optimizer: torch.optim.Optimizer, l1: float) -> None:
    """grad += l1 sign(w) for every parameter of the groups that get weight decay (see the module docstring)."""
    if not l1:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            if group.get("role") in ("decay", "muon"):
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(torch.sign(p), alpha=l1)


# ---------------------------------------------------------------- Muon


@functools.cache
def newton_schulz_orthogonalize(
    g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T (2-D), by the quintic Newton-Schulz iteration.

    Works on the wide orientation (rows <= cols) so X X^T is the smaller Gram matrix. `dtype`: the
    working precision; default bfloat16 on CUDA (the iteration tolerates it, as in the reference) and on CPUs
    with native bf16 matrix products (`cpu_has_native_bf16`: on 2 such cores the iteration over a 4 x 256
    Llama's 20 matrices takes 34 ms in bf16 against ~100 ms in fp32), float32 elsewhere (emulated bf16 is
    slower than fp32)."""
    a, b, c = NS_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda or (g.device.type == "cpu" and cpu_has_native_bf16()) else torch.float32
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm = 1, inside the iteration's basin
    # x <- a x + (b A + c A^2) x, each line one fused call: the scalar multiplies and adds written out cost as
    # much on a CPU at 256 wide (measured in bf16 over a 4 x 256 Llama's 20 matrices: 42.5 -> 33.8 ms a step)
    for _ in range(steps):
        gram = x @ x.T  # A: (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = torch.addmm(x, poly, x, beta=a)  # a x + poly x
    if tall:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True` (2-D parameters), AdamW for the others, in one optimizer so
    one `state_dict()` holds both. Muon groups take lr, momentum, nesterov, weight_decay; AdamW groups take
    lr, betas, eps, weight_decay (decoupled, as torch.optim.AdamW)."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps, weight_decay=weight_decay,
            ns_steps=ns_steps, use_muon=False,
        )  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                wrong = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if wrong:
                    raise ValueError(f"Muon updates 2-D weights only; got parameters of shapes {wrong}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)  # m = mu m + (1 - mu) g
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            update = newton_schulz_orthogonalize(update, group["ns_steps"])
            scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # p -= lr * m_hat / (sqrt(v_hat) + eps), with the bias corrections folded in as torch.optim.AdamW does
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))


# ---------------------------------------------------------------- schedules


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate for update number `step` (0-based) of a run of `max_steps` updates."""
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    step = max(step, 0)
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "exponential":
        progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
        return cfg.min_lr * (cfg.lr / cfg.min_lr) ** progress
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_fraction * max_steps)
        decay_start = max(warmup, max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """`lr_at` as a LambdaLR: every group's rate is its own base rate (cfg.lr for AdamW groups, cfg.muon_lr
    for Muon's) times lr_at(step) / cfg.lr, so Muon follows the same shape. Call `scheduler.step()` after
    each `optimizer.step()`."""
    lr_at(0, cfg, max_steps)  # validates max_steps now rather than at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
