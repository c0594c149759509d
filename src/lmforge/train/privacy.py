"""DP-SGD (Abadi et al., 2016) through Opacus: per-example clipping, Gaussian noise, Poisson sampling, accounting.

One private step, for a batch B drawn by Poisson sampling (each example in with probability q = 1 / batches per
epoch; `PoissonBatches`, over every process):

    g_i   = grad of example i's loss                                  (Opacus: per-example gradients)
    g~_i  = g_i / max(1, ||g_i|| / C)                                  (clip each to norm C = max_grad_norm)
    g     = (sum_i g~_i + N(0, sigma^2 C^2 I)) / (q N)                 (noise, then the expected batch size)

The noise multiplier sigma is calibrated by Opacus's accountant (`get_noise_multiplier`, PRV by default,
Gopi et al., 2021; RDP, Mironov 2017) so that the planned number of steps spends exactly the target (eps, delta);
it is `make_private_with_epsilon`'s calibration, done for a number of steps rather than of whole epochs, since a
run's length is `train.max_steps`. The ε spent so far is the accountant's, after the steps taken.

Opacus computes per-example gradients with a "grad sampler" per layer type; ours subclass or re-implement
torch's layers, so `register_grad_samplers` gives Opacus the four with parameters of their own:
TokenEmbedding (E[t] * scale), LearnedPositionalEmbedding (nn.Embedding's), LayerNorm (with an optional bias) and
RMSNorm (dL/dw = sum_t x_t / rms(x_t) * dL/dy_t). Everything else is nn.Linear or nn.Embedding, which Opacus has.
T5's relative position bias is one table shared by every example of the batch (its input is a (T, T) bucket
grid, not a batch), so it has no per-example gradient: such a layer is refused by name.

Several processes (DDP): one global Poisson batch, split between them; each clips its own examples, the
clipped sums are added over processes and the noise is added once (Opacus's DPDDP and distributed optimizer),
so the step equals the single-process one. A private run resumes exactly: the sampler's position and the
accountant's history are in the checkpoint (`PoissonBatches.state_dict`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.nn.embedding import LearnedPositionalEmbedding, RelativePositionBias, TokenEmbedding
from lmforge.nn.norm import LayerNorm, RMSNorm

ACCOUNTANTS = ("prv", "rdp")
EPSILON_TOLERANCE = 0.01  # the calibration reaches the target within this (Opacus's epsilon_tolerance)


def _sum_but_batch_and_last(tensor: torch.Tensor, n: int = 1) -> torch.Tensor:
    """(B, ..., X) -> (B, X): sum over every dimension but the batch and the last n."""
    return tensor.sum(dim=tuple(range(1, tensor.dim() - n))) if tensor.dim() > n + 1 else tensor


def _embedding_grad(layer: nn.Embedding, ids: torch.Tensor, backprops: torch.Tensor, scale: float = 1.0):
    """Per-example gradient of an embedding table: example b adds dL/dy_{b,t} * scale to row ids[b, t]."""
    B = backprops.shape[0]
    ids = ids.expand(B, *ids.shape[1:]) if ids.shape[0] == 1 and B > 1 else ids
    grad = torch.zeros(B, *layer.weight.shape, device=layer.weight.device, dtype=backprops.dtype)
    index = ids.reshape(B, -1, 1).expand(-1, -1, layer.embedding_dim)
    grad.scatter_add_(1, index, backprops.reshape(B, -1, layer.embedding_dim) * scale)
    return grad


def _token_embedding(layer: TokenEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: _embedding_grad(layer, activations[0], backprops, layer.scale)}


def _positional_embedding(layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: _embedding_grad(layer, activations[0], backprops)}


def _layer_norm(layer: LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    x = activations[0]
    grads = {}
    if layer.weight.requires_grad:
        normed = torch.nn.functional.layer_norm(x, layer.weight.shape, eps=layer.eps)
        grads[layer.weight] = _sum_but_batch_and_last(normed * backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = _sum_but_batch_and_last(backprops)
    return grads


def _rms_norm(layer: RMSNorm, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    if not layer.weight.requires_grad:
        return {}
    x = activations[0].float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps)).to(activations[0].dtype)
    return {layer.weight: _sum_but_batch_and_last(normed * backprops)}


GRAD_SAMPLERS: dict[type, Callable] = {
    TokenEmbedding: _token_embedding,
    LearnedPositionalEmbedding: _positional_embedding,
    LayerNorm: _layer_norm,
    RMSNorm: _rms_norm,
}


def register_grad_samplers() -> None:
    """Tell Opacus how to compute per-example gradients of our layers (idempotent)."""
    from opacus.grad_sample import register_grad_sampler

    for layer_type, sampler in GRAD_SAMPLERS.items():
        register_grad_sampler(layer_type)(sampler)


def check_per_example(model: nn.Module) -> None:
    """Refuse a model with a trainable layer that has no per-example gradient, naming the first one: Opacus's
    validator (batch norm mixes examples) and layers whose input is not a batch (a shared position bias)."""
    from opacus.validators import ModuleValidator

    for name, module in model.named_modules():
        if isinstance(module, RelativePositionBias) and any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"layer {name} (a relative position bias shared by every example) has no per-example gradient, "
                "so DP-SGD cannot clip it; freeze it or fine-tune a gpt, llama, bert or roberta model"
            )
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"a layer has no per-example gradient for DP-SGD: {errors[0]}; replace or freeze it")


@dataclass
class PrivacySettings:
    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str = "prv"
    epsilon_tolerance: float = EPSILON_TOLERANCE  # the calibrated noise spends between ε - this and ε


def check_settings(settings: PrivacySettings, n_examples: int) -> None:
    """ε > 0, 0 < δ < 1/N (a δ of 1/N or more allows publishing one example outright), C > 0."""
    if settings.epsilon <= 0:
        raise ValueError(f"privacy.epsilon={settings.epsilon} must be > 0 (e.g. 8; smaller is more private)")
    if not 0 < settings.delta < 1 / n_examples:
        raise ValueError(
            f"privacy.delta={settings.delta:g} must be in (0, 1/N) = (0, {1 / n_examples:.3g}) for N={n_examples} "
            f"training examples; use e.g. {10 ** -(len(str(n_examples)) + 1):g}"
        )
    if settings.max_grad_norm <= 0:
        raise ValueError(f"privacy.max_grad_norm={settings.max_grad_norm} must be > 0 (e.g. 1.0)")
    if settings.accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={settings.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")


class PoissonBatches:
    """Poisson sampling, checkpointable: each example joins each batch independently with probability q.

    Every process draws the same global batch from one generator seeded by train.seed (a mask of N uniform
    draws < q) and keeps its share, the selected examples rank, rank + W, rank + 2W, ... So the whole run
    samples exactly as one process would (each example's inclusion independent of every other's, which the
    accountant's subsampling analysis assumes), and the sampler's state is the same on every process: the
    number of batches drawn. Resuming replays that many draws (N random numbers each, microseconds) and reloads
    the accountant's history, so a resumed private run continues with the same batches, noise (torch's RNG,
    restored by the checkpoint) and ε as the uninterrupted one. Opacus's own `DPDataLoader` samples the same
    way but keeps no state to checkpoint.

    An empty draw is a real step (noise only; the accounting counts it), given as a batch of zero rows."""

    per_process = True  # batches are this process's share already: the loop does not split them by rank

    def __init__(
        self,
        dataset: Sequence[Any],
        collate: Callable,
        sample_rate: float,
        seed: int,
        accountant: Any,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset, self.collate, self.sample_rate, self.seed = dataset, collate, sample_rate, seed
        self.accountant, self.rank, self.world_size = accountant, rank, world_size
        self.per_epoch = round(1 / sample_rate)  # batches per pass: N q examples each, N in expectation
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0
        self.empty = {k: v[:0] for k, v in collate([dataset[0]]).items()}

    def __len__(self) -> int:
        return self.per_epoch

    def draw(self) -> list[int]:
        """The next global batch (indices of the examples drawn), advancing the generator."""
        mask = torch.rand(len(self.dataset), generator=self.generator) < self.sample_rate
        return mask.nonzero().flatten().tolist()

    def __iter__(self):
        for _ in range(self.per_epoch):
            mine = self.draw()[self.rank :: self.world_size]
            self.batches += 1
            yield self.collate([self.dataset[i] for i in mine]) if mine else self.empty

    def state_dict(self) -> dict:
        history = [list(entry) for entry in self.accountant.history]  # [[noise multiplier, q, steps], ...]
        return {"loader": "PoissonBatches", "batches": self.batches, "seed": self.seed, "accountant": history}

    def load_state_dict(self, state: dict) -> None:
        if state.get("loader") != "PoissonBatches":
            raise ValueError(
                "this checkpoint was saved by a run without privacy.epsilon: a private run cannot continue it "
                "(its earlier steps spent no budget under this accounting); start a new private run"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's train.seed is {state['seed']}, not {self.seed}: resume with it")
        self.generator = torch.Generator().manual_seed(self.seed)
        for _ in range(state["batches"]):
            self.draw()
        self.batches = state["batches"]
        self.accountant.history = [tuple(entry) for entry in state["accountant"]]


class PrivateTraining:
    """The model, optimizer and loader made private by Opacus, and the `train_loop` hook that logs ε and stops
    before a step would exceed the budget."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Sequence[Any],
        collate: Callable,
        batch_size: int,
        steps: int,
        settings: PrivacySettings,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """`batch_size` is the expected global batch (over all processes); with `world_size` > 1 the model is
        wrapped in Opacus's DPDDP (parameters broadcast from rank 0; clipped gradients summed over processes by
        its optimizer, the noise added once, on rank 0) instead of torch's DDP, whose all-reduce in backward
        would mix examples before they are clipped."""
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

        check_settings(settings, len(dataset))
        check_per_example(model)
        register_grad_samplers()
        self.settings, self.steps = settings, steps
        self.training_model = DifferentiallyPrivateDistributedDataParallel(model) if world_size > 1 else model
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        self.sample_rate = 1 / len(loader)
        # Opacus's hooks fire on modules whose inputs need no gradient (the embeddings): expected, not a problem
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        with warnings.catch_warnings():  # the RDP search notes when its best order is the largest it tries
            warnings.simplefilter("ignore", UserWarning)
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=settings.epsilon,
                target_delta=settings.delta,
                sample_rate=self.sample_rate,
                steps=steps,
                accountant=settings.accountant,
                epsilon_tolerance=settings.epsilon_tolerance,
            )
        with warnings.catch_warnings():  # the note that secure_mode is off: lmforge runs are for experiments
            warnings.simplefilter("ignore", UserWarning)
            self.engine = PrivacyEngine(accountant=settings.accountant, secure_mode=False)
        # Opacus's loader is replaced by PoissonBatches (the same sampling, with a state to checkpoint); its
        # sampling rate, 1 / len(loader), is the one the optimizer's expected batch size and the accountant use
        self.module, self.optimizer, _ = self.engine.make_private(
            module=self.training_model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
        )
        self.loader = PoissonBatches(
            dataset, collate, self.sample_rate, seed, self.engine.accountant, rank=rank, world_size=world_size
        )

    def epsilon(self) -> float:
        """ε spent by the steps taken so far (the accountant's, at the run's δ)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        return float(self.engine.accountant.get_epsilon(delta=self.settings.delta))

    def epsilon_after_next_step(self) -> float:
        accountant = copy.deepcopy(self.engine.accountant)
        accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(accountant.get_epsilon(delta=self.settings.delta))

    # ---- the train_loop hook
    # Opacus's per-example gradients undo a mean over this process's examples (GradSampleModule multiplies by
    # the local batch size), so each process's loss must be its own mean, not a share of the global one
    per_process_mean = True

    def before_step(self, step: int) -> str | None:
        """A reason to stop before this step: the next step would spend more than the budget."""
        if step < self.steps:
            return None  # the calibration covers the planned steps
        after = self.epsilon_after_next_step()
        if after > self.settings.epsilon * (1 + EPSILON_TOLERANCE):
            return (
                f"privacy budget: one more step would spend ε={after:.3f} > privacy.epsilon={self.settings.epsilon:g}"
            )
        return None

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon()}

    def summary(self) -> dict[str, float]:
        return {
            "epsilon_spent": self.epsilon(),
            "epsilon_target": self.settings.epsilon,
            "delta": self.settings.delta,
            "max_grad_norm": self.settings.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant": self.settings.accountant,
        }


def make_private(
    config: Any,
    info: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Sequence[Any],
    collate: Callable,
    refused: dict[str, bool] | None = None,
) -> tuple[PrivateTraining, Any, str]:
    """A recipe's run made private (`config` has .train, .optim and .privacy sections; `info` is the run's
    DistInfo): Poisson-sampled batches of train.batch_size expected examples per process, per-example clipping at
    privacy.max_grad_norm replacing optim.grad_clip, noise calibrated to spend privacy.epsilon over
    train.max_steps. Settings that would break the guarantee or Opacus's hooks are refused first, one line each,
    with the recipe's own `refused` ({what: present}). Returns the private run, the config it runs with (no
    optim.grad_clip) and the line to print."""
    from lmforge.train.parallel import parallel_mode

    tc, p = config.train, config.privacy
    refused = {
        "train.grad_accum > 1 (Poisson batches are drawn whole; raise train.batch_size)": tc.grad_accum > 1,
        "train.compile (Opacus's per-example hooks)": tc.compile,
        "train.dtype=float16 (the GradScaler does not see per-example gradients)": tc.dtype == "float16",
        "optim.l1 > 0 (Opacus rebuilds the gradients from clipped per-example ones)": config.optim.l1 > 0,
        f"train.parallel={tc.parallel} (Opacus's DPDDP keeps whole replicas)": parallel_mode(tc.parallel).sharded,
        **(refused or {}),
    }
    for what, present in refused.items():
        if present:
            raise ValueError(f"privacy.epsilon is set, which does not go with {what}")
    private = PrivateTraining(
        model,
        optimizer,
        dataset,
        collate,
        tc.batch_size * info.world_size,  # the expected global batch, as without privacy
        tc.max_steps,
        PrivacySettings(p.epsilon, p.delta, p.max_grad_norm, p.accountant),
        tc.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    message = (
        f"DP-SGD (Opacus): ε={p.epsilon:g}, δ={p.delta:g}, C={p.max_grad_norm:g}, noise multiplier "
        f"{private.noise_multiplier:.3f}, sampling rate {private.sample_rate:.4f}; per-example clipping replaces "
        "optim.grad_clip"
    )
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, grad_clip=0.0))
    return private, config, message
