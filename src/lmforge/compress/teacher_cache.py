"""A causal-LM teacher's next-token distributions cached on disk as their top K, so that later epochs (and a
resumed run) distil without running the teacher (`lmforge distill --cache-topk K`).

At each target position of a training sequence the cache keeps the teacher's K most probable tokens at
temperature T, their log-probabilities and the log of the mass left to the other V - K tokens:

    log p_i    = z_i / T - logsumexp(z / T)                               i in top_K(z)
    log p_tail = logsumexp_{j not in top_K(z)}(z_j / T) - logsumexp(z / T)

The divergences (forward KL, reverse KL, generalised JSD) then compare (K+1)-way coarsened distributions, the
teacher's (p_1, ..., p_K, p_tail) and the student's (q_1, ..., q_K, q_tail) at the same K tokens, its tail
q_tail = sum_{j not in top_K} q_j computed as a logsumexp (never 1 - sum, which cancels). Both are images of the
full distributions under one map (each top-K token to its own class, every other token to the tail), so the
data-processing inequality makes the coarsened divergence a lower bound of the full one (all three are
f-divergences), exact when K = V: there is no tail then and the map only permutes the tokens. The T^2 scaling and
the sums over target tokens are those of the on-the-fly loss (`lmforge.compress.distill`).

Layout of the cache folder (run_dir/teacher_cache/):
    meta.json             {"format", "teacher" (SHA-256 of its config and weights), "temperature", "k", "vocab_size"}
    <hash>.safetensors    shards; per sequence "<key>.indices" (n, K) int32, "<key>.log_probs" (n, K) float32 and
                          "<key>.tail" (n,) float32, n the sequence's target positions in order

A sequence's key is the SHA-256 of its real token ids and of which positions are targets, so a changed dataset
misses and fills rather than reusing stale rows; a cache built for another teacher, temperature, K or vocabulary is
refused by its meta.json, naming the differences. Each batch with new sequences writes one shard atomically, named
by the hash of its keys; a run reads every shard when it starts and looks again on a miss (another process of the
run may have written it), then runs the teacher on the sequences still missing, only those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.finetune.tasks.base import model_inputs
from lmforge.hf.files import write_safetensors
from lmforge.io import atomic_path, write_json_atomic

META = "meta.json"
FORMAT = 1


@dataclass(frozen=True)
class CacheMeta:
    """What the cached values depend on besides the sequences: a cache is reused only when all of it matches."""

    format: int
    teacher: str
    temperature: float
    k: int
    vocab_size: int


@dataclass
class TopKTargets:
    """The teacher's coarsened distribution at N target positions: `log_probs` (N, K), or (N, K + 1) with the
    tail bucket last when K < V, over its top-K tokens `indices` (N, K)."""

    indices: torch.Tensor
    log_probs: torch.Tensor

    def coarsen(self, log_q: torch.Tensor) -> torch.Tensor:
        """The student's log-probabilities (N, V) mapped the same way: its values at the teacher's top-K tokens,
        then log q_tail = logsumexp over the other tokens."""
        top = log_q.gather(-1, self.indices)
        if self.log_probs.shape[-1] == top.shape[-1]:  # K = V: no tail, the distributions themselves
            return top
        tail = log_q.scatter(-1, self.indices, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.cat([top, tail], -1)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's config and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def row_key(ids: torch.Tensor, real: torch.Tensor, units: torch.Tensor) -> str:
    """SHA-256 of a sequence's real token ids (as int64) and of which of those positions are targets."""
    digest = hashlib.sha256(ids[real].to(torch.int64).cpu().numpy().tobytes())
    digest.update(units[real].to(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class TopKCache:
    """The teacher's top-K next-token distributions per training sequence, filled on first sight and read from
    `folder` afterwards (see the module docstring); `targets(batch, units, shape)` gives a batch's."""

    def __init__(self, folder: Path, teacher: nn.Module, temperature: float, k: int) -> None:
        vocab = teacher.config.vocab_size
        if not 1 <= k <= vocab:
            raise ValueError(f"--cache-topk {k} must be between 1 and the teacher's vocabulary of {vocab} tokens")
        self.folder, self.teacher, self.temperature, self.k = Path(folder), teacher, temperature, k
        self.meta = CacheMeta(FORMAT, fingerprint(teacher), float(temperature), k, vocab)
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.shards: set[str] = set()
        self._check_meta()
        self.refresh()

    def _check_meta(self) -> None:
        file = self.folder / META
        if not file.is_file():
            write_json_atomic(file, asdict(self.meta))
            return
        stored = json.loads(file.read_text(encoding="utf-8"))
        differing = [
            f"{name} {stored.get(name)!r} (this run: {value!r})"
            for name, value in asdict(self.meta).items()
            if stored.get(name) != value
        ]
        if differing:
            raise ValueError(
                f"the teacher cache {self.folder} was built with another {'; '.join(differing)}; delete that folder "
                "to rebuild it for this run, or distil with the settings it was built with"
            )

    def refresh(self) -> None:
        """Read the shards not read yet."""
        for path in sorted(self.folder.glob("*.safetensors")):
            if path.name in self.shards:
                continue
            tensors = load_file(str(path))
            for name in tensors:
                if name.endswith(".indices"):
                    key = name.removesuffix(".indices")
                    self.rows[key] = (tensors[name], tensors[f"{key}.log_probs"], tensors[f"{key}.tail"])
            self.shards.add(path.name)

    def targets(self, batch: dict[str, torch.Tensor], units: torch.Tensor, shape: torch.Size) -> TopKTargets:
        """The teacher's coarsened distributions at the batch's target positions `units` (B, T), in the order of
        `logits[units]`; `shape` is the student's logits' (B, T, V). Runs the teacher on uncached sequences only."""
        if len(shape) != 3 or shape[-1] != self.meta.vocab_size:
            raise ValueError(
                f"the student's logits have shape {tuple(shape)}, the cached teacher's {self.meta.vocab_size} "
                "next-token scores per position: --cache-topk needs a causal LM student on the teacher's vocabulary"
            )
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        keys = [row_key(batch["input_ids"][b], real[b], units[b]) for b in range(units.shape[0])]
        if any(key not in self.rows for key in keys):
            self.refresh()
        missing = [b for b, key in enumerate(keys) if key not in self.rows]
        if missing:
            self._fill(batch, units, missing, keys)
        device = units.device
        indices = torch.cat([self.rows[key][0] for key in keys]).to(device, torch.long)
        log_probs = torch.cat([self.rows[key][1] for key in keys]).to(device)
        if self.k < self.meta.vocab_size:
            tail = torch.cat([self.rows[key][2] for key in keys]).to(device)
            log_probs = torch.cat([log_probs, tail[:, None]], -1)
        return TopKTargets(indices, log_probs)

    def _fill(self, batch: dict[str, torch.Tensor], units: torch.Tensor, missing: list[int], keys: list[str]) -> None:
        """Run the teacher on the `missing` rows, keep their top-K at the target positions, write them as a shard."""
        rows = torch.tensor(missing, device=units.device)
        inputs = {name: value[rows] for name, value in model_inputs(self.teacher, batch).items()}
        with torch.no_grad():
            log_p = F.log_softmax(self.teacher(**inputs).logits.float() / self.temperature, -1)  # (b, T, V)
            values, indices = log_p.topk(self.k, dim=-1)  # (b, T, K)
            tail = log_p.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (b, T): -inf when K = V
        new = {}
        for i, b in enumerate(missing):
            at = units[b]
            new[keys[b]] = (indices[i][at].to(torch.int32).cpu(), values[i][at].cpu(), tail[i][at].cpu())
        tensors = {}
        for key, (top, log_probs, rest) in new.items():
            tensors.update({f"{key}.indices": top, f"{key}.log_probs": log_probs, f"{key}.tail": rest})
        name = hashlib.sha256("".join(sorted(new)).encode()).hexdigest()[:32] + ".safetensors"
        with atomic_path(self.folder / name) as tmp:
            write_safetensors(tensors, tmp)
        self.rows.update(new)
        self.shards.add(name)
