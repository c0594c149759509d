"""Knowledge distillation: a student fine-tuned on a task against a teacher's outputs, on the shared loop.

`distill` is a `lmforge.finetune` run whose training loss is `DistillObjective` instead of the task's own: the
task still reads the data, encodes it, evaluates, checkpoints, resumes, reports and saves `model/` with
task.json, so a distilled student is used like any fine-tuned model (`lmforge evaluate`, `predict`). Per unit
the task averages over (an example, or a target token), with weights w:

    L = w_hard L_task(student)
      + w_soft T^2 D(p_teacher^T, p_student^T)          p^T = softmax(logits / T)   (Hinton et al. 2015)
      + w_hidden mean_l MSE(W_l h_student^l, h_teacher^m(l))                         (FitNets, TinyBERT)
      + w_cosine mean_l (1 - cos(W_l h_student^l, h_teacher^m(l)))                   (DistilBERT)
      + w_attention mean_l mean_heads KL(A_teacher^m(l) || A_student^l)   per query  (TinyBERT, MiniLM)

The T^2 keeps the soft term's gradients on the scale of the hard term's as T grows (Hinton et al., section 2).
D is one of three divergences (`DIVERGENCES`): forward KL(p_t || p_s), the classic choice, which makes the
student cover every mode of the teacher; reverse KL(p_s || p_t), mode-seeking, preferred for generative
students (MiniLLM, Gu et al. 2024); and the generalised Jensen-Shannon divergence with weight beta,
beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s (GKD, Agarwal et al. 2024),
which interpolates between the two. Student layer l (of L_s) is matched with teacher layer
m(l) = round((l + 1) L_t / L_s) - 1, so the last layers always meet; hidden states are compared per token
(over real tokens; an example's loss is the mean over its tokens). The attention term compares each head's
distribution over keys, softmax(Q K^T / sqrt(d) + M), recorded while both models run (MiniLM, Wang et al. 2020,
uses this KL on the last layer; TinyBERT, Jiao et al. 2020, an MSE on every mapped layer).

W_l is the identity when student and teacher are equally wide; otherwise a learned Linear(d_student, d_teacher)
per student layer (TinyBERT's W_h, FitNets' regressor; TinyBERT's code shares one across layers, one per layer
lets each matched pair find its own map), initialised like any Linear and trained jointly with the student by the
same optimizer. The projections are the objective's `loss_module`: every checkpoint keeps them, so a resumed run
continues exactly, and the saved student never holds them.

For a causal LM the teacher's distributions can be cached to disk as their top K (`--cache-topk K`,
`lmforge.compress.teacher_cache`): the first epoch fills the cache and later epochs, or a resumed run, read it
without running the teacher; D then compares the (K+1)-way coarsened distributions (the top-K tokens and one
tail bucket), a lower bound of the full divergence that is exact when K = V.

Both models read the same token ids, so they must share a vocabulary (checked before the run). The student is
a preset (random weights), a model folder, or the teacher with every k-th layer kept (`keep_every`, as
DistilBERT initialises from BERT by taking one layer of two).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.teacher_cache import TopKCache
from lmforge.compress.transfer import Transfer
from lmforge.finetune.tasks.base import Task, model_inputs
from lmforge.nn import Block
from lmforge.nn.loss import IGNORE_INDEX
from lmforge.train.distributed import unwrap_model
from lmforge.train.objective import Objective

if TYPE_CHECKING:
    from lmforge.finetune.config import FinetuneConfig

TASK_FILE = "task.json"
CACHE_DIR = "teacher_cache"  # in the run folder (`lmforge.compress.teacher_cache`)


class Divergence(ABC):
    """D(p_teacher, p_student) per unit. `between` takes log-probabilities over the same classes (the whole
    vocabulary, or a coarsened one); calling it takes logits (N, K) at temperature T (not yet scaled by T^2)."""

    name: ClassVar[str]

    @abstractmethod
    def between(self, log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
        """(N,) divergences from the student's and the teacher's log-probabilities (N, C)."""

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
        """(N,) divergences between softmax(teacher / T) and softmax(student / T)."""
        return self.between(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), beta)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_k p_k (log p_k - log q_k) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class ForwardKL(Divergence):
    name = "kl"

    def between(self, log_s, log_t, beta):
        return kl(log_t, log_s)


class ReverseKL(Divergence):
    name = "reverse_kl"

    def between(self, log_s, log_t, beta):
        return kl(log_s, log_t)


class GeneralisedJSD(Divergence):
    name = "jsd"

    def between(self, log_s, log_t, beta):
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1 - beta))  # log of the mixture m
        return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


DIVERGENCES: dict[str, Divergence] = {d.name: d for d in (ForwardKL(), ReverseKL(), GeneralisedJSD())}


@dataclass(frozen=True)
class DistillSettings:
    """The loss weights and the soft-target settings (see the module docstring)."""

    divergence: str = "kl"
    temperature: float = 2.0
    beta: float = 0.5  # generalised JSD's weight of the teacher
    soft: float = 1.0
    hard: float = 1.0
    hidden: float = 0.0
    cosine: float = 0.0
    attention: float = 0.0
    cache_topk: int | None = None  # causal LMs: the teacher's top-K log-probabilities cached on disk (None: off)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"--divergence {self.divergence!r} is unknown; choose one of {', '.join(DIVERGENCES)}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature {self.temperature} must be positive (2 to 4 is usual)")
        if not 0 < self.beta < 1:
            raise ValueError(f"--beta {self.beta} must be in (0, 1)")
        weights = {k: getattr(self, k) for k in ("soft", "hard", "hidden", "cosine", "attention")}
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"loss weights {weights} must be >= 0 and not all 0")
        if self.cache_topk is not None:
            if isinstance(self.cache_topk, bool) or not isinstance(self.cache_topk, int) or self.cache_topk < 1:
                raise ValueError(f"--cache-topk {self.cache_topk!r} must be a whole number >= 1 (e.g. 64)")
            if not self.soft:
                raise ValueError("--cache-topk caches the soft targets, which --soft 0 does not use; drop one")
            inner = [k for k in ("hidden", "cosine", "attention") if getattr(self, k)]
            if inner:
                raise ValueError(
                    f"--cache-topk stores the teacher's logits only, but --{inner[0]} needs its hidden states on "
                    f"every batch; set --{' --'.join(f'{k} 0' for k in inner)} or drop --cache-topk"
                )


def blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """m(l) = round((l + 1) L_t / L_s) - 1 for each student layer l."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float | None
) -> torch.Tensor:
    """softmax(Q K^T * scale + M) (B, H, T_q, T_k), the attention distribution of every head and query."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    if is_causal:
        t_q, t_k = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1)


class Capture:
    """Keeps the last output of a model and, when asked, of each of its blocks and each self-attention's
    distribution (its attention function is swapped for one that records softmax(Q K^T * s + M))."""

    def __init__(self, model: nn.Module, hidden: bool, attention: bool) -> None:
        self.output = None
        self.hidden: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self.hooks = [model.register_forward_hook(self._keep_output)]
        if hidden:
            self.hooks += [b.register_forward_hook(self._keep_hidden) for b in blocks(model)]
        self.swapped = [(b.attn, b.attn.attend) for b in blocks(model)] if attention else []
        for attn, _ in self.swapped:
            attn.attend = self._recording

    def _keep_output(self, _module, _args, output) -> None:
        self.output = output

    def _keep_hidden(self, _module, _args, output) -> None:
        self.hidden.append(output)

    def _recording(self, q, k, v, mask=None, is_causal=False, scale=None, dropout_p=0.0) -> torch.Tensor:
        probabilities = attention_probabilities(q, k, mask, is_causal, scale)
        self.attention.append(probabilities)
        return F.dropout(probabilities, p=dropout_p).to(v.dtype) @ v

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        for attn, original in self.swapped:
            attn.attend = original


@dataclass
class FullTargets:
    """The teacher's whole distribution at N units, log-probabilities (N, V): nothing to coarsen."""

    log_probs: torch.Tensor

    def coarsen(self, log_q: torch.Tensor) -> torch.Tensor:
        return log_q


class LiveTeacher:
    """Soft targets from the teacher run on every batch (its hidden states and attention maps are recorded by the
    caller's `Capture` as it runs)."""

    def __init__(self, teacher: nn.Module, temperature: float) -> None:
        self.teacher, self.temperature = teacher, temperature

    def targets(self, batch: dict[str, torch.Tensor], units: torch.Tensor, shape: torch.Size) -> FullTargets:
        logits = self.teacher(**model_inputs(self.teacher, batch)).logits.float()
        if logits.shape != shape:
            raise ValueError(
                f"the teacher's logits have shape {tuple(logits.shape)} and the student's {tuple(shape)}: teacher and "
                "student are for different tasks or label sets; distil from a teacher fine-tuned for the same task "
                "and data"
            )
        return FullTargets(F.log_softmax(logits[units] / self.temperature, -1))


class DistillObjective(Objective):
    """The task's loss plus the distillation terms; counts the task's units (examples or target tokens). The
    soft targets come from the teacher run on each batch, or from a `TopKCache` in `cache_dir` when
    `settings.cache_topk` is set; `loss_module` holds the width projections when the student is narrower or
    wider than the teacher and a hidden-state term is on."""

    name = "distill"

    def __init__(
        self,
        task: Task,
        student: nn.Module,
        teacher: nn.Module,
        settings: DistillSettings,
        cache_dir: Path | None = None,
    ) -> None:
        self.task, self.teacher, self.settings = task, teacher.eval(), settings
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if settings.cache_topk is not None and cache_dir is None:
            raise ValueError("--cache-topk needs a folder for the cache (distill puts it in the run folder)")
        self.source = (
            LiveTeacher(self.teacher, settings.temperature)
            if settings.cache_topk is None
            else TopKCache(cache_dir, self.teacher, settings.temperature, settings.cache_topk)
        )
        self.projections = width_projections(unwrap_model(student), self.teacher, settings)
        self.loss_module = self.projections if list(self.projections.parameters()) else None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.count(batch)

    def tokens(self, micro: list[dict[str, torch.Tensor]]) -> int:
        return self.task.tokens(micro)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.settings
        hidden, attention = bool(s.hidden or s.cosine), bool(s.attention)
        student = unwrap_model(model)
        device = next(student.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with Capture(student, hidden, attention) as caught:
            loss = self.task.loss_sum(model, batch) * s.hard
        s_logits = caught.output.logits.float()
        units = self.unit_mask(batch, s_logits)
        with torch.no_grad(), Capture(self.teacher, hidden, attention) as taught:
            targets = self.source.targets(batch, units, s_logits.shape)
        if s.soft:
            log_q = F.log_softmax(s_logits[units] / s.temperature, -1)  # (N, V) at the units
            divergence = DIVERGENCES[s.divergence].between(targets.coarsen(log_q), targets.log_probs, s.beta)
            loss = loss + s.soft * s.temperature**2 * divergence.sum()
        if hidden:
            mapping = layer_map(len(caught.hidden), len(taught.hidden))
            pairs = [(self.projections[i](caught.hidden[i].float()), taught.hidden[j]) for i, j in enumerate(mapping)]
            for h_s, h_t in pairs:
                if h_s.shape != h_t.shape:
                    raise ValueError(
                        f"hidden states of shape {tuple(h_s.shape)} (student, projected) and {tuple(h_t.shape)} "
                        "(teacher): the hidden and cosine losses compare them token by token; set their weights to 0"
                    )
            if s.hidden:
                per_token = sum(F.mse_loss(a.float(), b.float(), reduction="none").mean(-1) for a, b in pairs)
                loss = loss + s.hidden * self.reduce(per_token / len(pairs), batch, units)
            if s.cosine:
                per_token = sum(1 - F.cosine_similarity(a.float(), b.float(), dim=-1) for a, b in pairs)
                loss = loss + s.cosine * self.reduce(per_token / len(pairs), batch, units)
        if attention:
            mapping = layer_map(len(caught.attention), len(taught.attention))
            per_token = 0
            for i, j in enumerate(mapping):
                p_s, p_t = caught.attention[i], taught.attention[j]  # (B, H, T, T)
                if p_s.shape != p_t.shape:
                    raise ValueError(
                        f"attention maps of shape {tuple(p_s.shape[1:])} (student) and {tuple(p_t.shape[1:])} "
                        "(teacher): the attention loss needs as many heads in both; set --attention 0"
                    )
                log_t, log_s = p_t.clamp(min=1e-30).log(), p_s.clamp(min=1e-30).log()
                per_token = per_token + (p_t * (log_t - log_s)).sum(-1).mean(1)  # KL per query, mean over heads
            loss = loss + s.attention * self.reduce(per_token / len(mapping), batch, units)
        return loss

    def unit_mask(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """Which logits rows are units: every example for (B, K) logits; target tokens for (B, T, V)."""
        if logits.dim() == 2:
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        targets = self.task.targets(batch) if hasattr(self.task, "targets") else batch.get("labels")
        if targets is not None and targets.shape == logits.shape[:2]:
            return targets != IGNORE_INDEX
        return batch["attention_mask"].bool()

    def reduce(self, per_token: torch.Tensor, batch: dict[str, torch.Tensor], units: torch.Tensor) -> torch.Tensor:
        """Per-token losses (B, T) summed over the units: target tokens, or per example the mean over its tokens."""
        if units.dim() == 2:
            return per_token[units].sum()
        mask = batch.get("attention_mask", torch.ones_like(per_token)).to(per_token.dtype)
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1))[units].sum()


def width_projections(student: nn.Module, teacher: nn.Module, settings: DistillSettings) -> nn.ModuleList:
    """W_l for each student layer (module docstring): Linear(d_student, d_teacher) when the widths differ and a
    hidden-state term is on, else the identity (no parameters)."""
    d_student, d_teacher = student.config.d_model, teacher.config.d_model
    learned = d_student != d_teacher and bool(settings.hidden or settings.cosine)
    return nn.ModuleList(
        nn.Linear(d_student, d_teacher) if learned else nn.Identity() for _ in range(len(blocks(student)))
    )


def keep_every(model: nn.Module, k: int) -> nn.Module:
    """A copy of `model` with blocks 0, k, 2k, ... only (DistilBERT's initialisation with k = 2)."""
    if not hasattr(model, "blocks") or not isinstance(model.blocks, nn.ModuleList):
        raise ValueError(
            f"--keep-every needs a decoder- or encoder-only model (gpt, llama, bert); {model.config.family} has none"
        )
    if k < 1 or k > len(model.blocks):
        raise ValueError(f"--keep-every {k} must be between 1 and the teacher's {len(model.blocks)} layers")
    student = copy.deepcopy(model)
    student.blocks = nn.ModuleList(student.blocks[i] for i in range(0, len(model.blocks), k))
    for i, block in enumerate(student.blocks):
        block.attn.layer_idx = i  # the KV cache's key
    student.config = model.config.replace(n_layer=len(student.blocks))
    return student


def vocabulary(tokenizer: Any) -> dict[str, int]:
    backend = tokenizer.backend
    if hasattr(backend, "get_vocab"):
        return backend.get_vocab(with_added_tokens=True)
    return {str(i): i for i in range(tokenizer.vocab_size)}


def teacher_task(folder: Path) -> str | None:
    """The task a fine-tuned teacher folder was trained for (its task.json), or None for a plain model."""
    task_file = folder / TASK_FILE
    if not task_file.is_file():
        return None
    return json.loads(task_file.read_text(encoding="utf-8")).get("task")


def distill(
    teacher: str,
    task: str,
    finetune_args: list[str],
    student: str | None = None,
    every: int | None = None,
    settings: DistillSettings | None = None,
    transfer: Transfer | None = None,
) -> dict:
    """Distil `teacher` into a student for `task`; `finetune_args` are `lmforge finetune` flags (data, steps,
    out, ...). The student is `student` (a preset or model folder) or the teacher with every `every`-th layer;
    `transfer`, unlabelled texts the teacher alone labels (`lmforge.compress.transfer`), joins the training
    records. Returns the fine-tuning run's summary, with the distillation settings."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.tasks import TASKS
    from lmforge.hf.load import load_model
    from lmforge.hf.resolve import resolve_model
    from lmforge.train.config import parse_args

    settings = settings or DistillSettings()
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    if (student is None) == (every is None):
        raise ValueError(
            "give the student: --student PRESET_OR_FOLDER, or --keep-every K (the teacher's every K-th layer)"
        )
    source = resolve_model(teacher, presets=False).path
    trained_for = teacher_task(source)
    if trained_for is not None and trained_for != task:
        raise ValueError(
            f"the teacher {teacher} was fine-tuned for {trained_for!r}, not {task!r}: teacher and student must be "
            f"for the same task; pass --task {trained_for} or another teacher"
        )
    teacher_model = load_model(source, head=None if trained_for else TASKS[task].head)
    if settings.cache_topk is not None and teacher_model.config.head != "causal_lm":
        raise ValueError(
            f"--cache-topk caches a causal LM's next-token distributions; the teacher {teacher} has a "
            f"{teacher_model.config.head} head: drop --cache-topk"
        )
    teacher_tokenizer = load_tokenizer(source)

    flags = [*finetune_args, f"--task={task}"]
    config = parse_args([*flags, f"--model={student or teacher}"], FINETUNE)
    if not config.train.name:  # one run folder whatever the student is called
        flags.append(f"--train.name=distill-{Path(config.data.dataset).stem}-{task}")
        config = parse_args([*flags, f"--model={student or teacher}"], FINETUNE)
    if transfer is not None:
        transfer.check(config)
    created = [folder for folder in (config.run_dir, config.run_dir.parent) if not folder.exists()]
    try:
        return _distill(config, flags, teacher, teacher_model, teacher_tokenizer, source, student, every, settings,
                        transfer)  # fmt: skip
    except BaseException:  # the student-init written below is no result: leave no half-made run folder
        from lmforge.finetune.recipe import holds_results

        if created and config.run_dir.is_dir() and not holds_results(config.run_dir):
            shutil.rmtree(config.run_dir, ignore_errors=True)
            if config.run_dir.parent in created and not any(config.run_dir.parent.iterdir()):
                config.run_dir.parent.rmdir()
        raise


def _distill(
    config: FinetuneConfig,
    flags: list[str],
    teacher: str,
    teacher_model: nn.Module,
    teacher_tokenizer: Any,
    source: Path,
    student: str | None,
    every: int | None,
    settings: DistillSettings,
    transfer: Transfer | None,
) -> dict:
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.finetune.config import FINETUNE
    from lmforge.finetune.recipe import finetune
    from lmforge.hf.resolve import resolve_model
    from lmforge.hf.save import save_model
    from lmforge.io import write_json_atomic
    from lmforge.models import PRESETS
    from lmforge.train.config import parse_args

    if every is not None:
        init = config.run_dir / "student-init"
        if not (init / "config.json").is_file():
            save_model(keep_every(teacher_model, every), init, tokenizer=teacher_tokenizer, overwrite=True)
        student = str(init)
    if student in PRESETS:  # random weights: the teacher's tokenizer, so both read the same ids
        config = parse_args([*flags, f"--model={student}", f"--model.tokenizer={source}"], FINETUNE)
    else:
        student_path = resolve_model(student, presets=False).path
        if vocabulary(load_tokenizer(student_path)) != vocabulary(teacher_tokenizer):
            raise ValueError(
                f"the student {student} and the teacher {teacher} have different vocabularies: both read the same "
                "token ids, so distil into a student built on the teacher's tokenizer (a preset, --keep-every, or a "
                "model trained with it)"
            )
        config = parse_args([*flags, f"--model={student_path}"], FINETUNE)

    cache = config.run_dir / CACHE_DIR if settings.cache_topk is not None else None  # k-fold: one for every fold
    summary = finetune(
        config,
        objective=lambda t, m: DistillObjective(t, m, teacher_model, settings, cache),
        extra_train=None if transfer is None else transfer.features,
    )
    summary["distill"] = {"teacher": str(teacher), "student": student, **asdict(settings)}
    if transfer is not None:
        summary["distill"]["transfer"] = asdict(transfer)
    if Path(summary["run_dir"]).is_dir():
        write_json_atomic(Path(summary["run_dir"]) / "distill.json", summary["distill"])
    return summary


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    return DistillSettings(
        divergence=args.divergence,
        temperature=args.temperature,
        beta=args.beta,
        soft=args.soft,
        hard=args.hard,
        hidden=args.hidden,
        cosine=args.cosine,
        attention=args.attention,
        cache_topk=args.cache_topk,
    )
