"""Sharded model and optimizer state with `torch.distributed.checkpoint` (DCP), for FSDP and tensor-parallel runs.

Every rank writes the shards it holds (`__R_0.distcp`) and rank 0 the `.metadata` that maps each tensor's
global shape to the pieces, last. State dicts come from `torch.distributed.checkpoint.state_dict`: model and
optimizer keyed by parameter name (FQN), whatever the wrapping, so the same folder loads into any layout:
2 FSDP ranks, 1 plain process, another mesh. DCP reads, for each tensor this process wants, the byte ranges
of the saved shards that overlap its local piece: resharding is exact (a copy, no arithmetic).

Without a process group (one process) DCP reads and writes as a single rank.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate

from lmforge.hf.runs import SHARDED, is_sharded
from lmforge.train.distributed import DistInfo
from lmforge.train.parallel import canonical_rows, fused_layouts, rank_major_rows


def write_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write this rank's shards of the model's and optimizer's state into folder/sharded/ (collective: every
    rank calls it with the same folder)."""
    model_state, optim_state = _state_dicts(model, optimizer)
    for name, (sections, tp) in fused_layouts(model).items():  # tensor parallel: back to the layer's row order
        for values, key in _entries(name, model_state, optim_state):
            values[key] = canonical_rows(values[key].full_tensor(), sections, tp)
    state = {"model": model_state} | ({"optimizer": optim_state} if optimizer is not None else {})
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=Path(folder) / SHARDED)


def read_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load folder/sharded/ into `model` (and `optimizer`) in place, in whatever layout they are now. A tensor
    the checkpoint lacks or holds with another shape is refused, naming it."""
    folder = Path(folder)
    if not is_sharded(folder):
        raise FileNotFoundError(f"{folder / SHARDED} has no .metadata: the sharded save was cut short")
    model_state, optim_state = _state_dicts(model, optimizer)
    fused = fused_layouts(model)
    targets = {
        (name, id(values), key): values[key]
        for name in fused
        for values, key in _entries(name, model_state, optim_state)
    }
    for name in fused:  # read whole, in the layer's row order; each rank keeps its rows below
        for values, key in _entries(name, model_state, optim_state):
            values[key] = torch.empty(values[key].shape, dtype=values[key].dtype, device=values[key].device)
    state = {"model": model_state} | ({"optimizer": optim_state} if optimizer is not None else {})
    _check_shapes(folder, model_state)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=folder / SHARDED)
    except (RuntimeError, KeyError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{folder / SHARDED} does not fit this model/optimizer ({reason}); resume with the settings the run used"
        ) from None
    for name, (sections, tp) in fused.items():
        for values, key in _entries(name, model_state, optim_state):
            target = targets[(name, id(values), key)]
            whole = DTensor.from_local(
                rank_major_rows(values[key], sections, tp), target.device_mesh, [Replicate()] * target.device_mesh.ndim
            )
            values[key] = whole.redistribute(target.device_mesh, target.placements)  # a local slice, no traffic
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """Model and optimizer state dicts keyed by parameter name, in new containers: the optimizer's may hold
    its live per-parameter dicts, which the row reordering below must not touch."""
    model_state, optim_state = get_state_dict(model, optimizer if optimizer is not None else [])
    if optim_state:
        optim_state = {**optim_state, "state": {k: dict(v) for k, v in optim_state.get("state", {}).items()}}
    return dict(model_state), optim_state


def _entries(name: str, model_state: dict, optim_state: dict) -> list[tuple[dict, str]]:
    """(dict, key) of parameter `name` and of its optimizer moments (not the 0-d step count)."""
    moments = optim_state.get("state", {}).get(name, {}) if optim_state else {}
    found = [(moments, key) for key, value in moments.items() if isinstance(value, torch.Tensor) and value.ndim > 0]
    return [(model_state, name)] + found


def _check_shapes(folder: Path, model_state: dict) -> None:
    """Compare the saved global shapes with the model's before reading any bytes: another model's checkpoint
    is named, not half-loaded."""
    metadata = dcp.FileSystemReader(str(folder / SHARDED)).read_metadata().state_dict_metadata
    saved = {key.removeprefix("model."): meta.size for key, meta in metadata.items() if key.startswith("model.")}
    wanted = {name: tuple(t.shape) for name, t in model_state.items() if isinstance(t, torch.Tensor)}
    missing = sorted(set(wanted) - set(saved))
    wrong = [f"{n}: {tuple(saved[n])} vs {shape}" for n, shape in wanted.items()
             if n in saved and tuple(saved[n]) != shape]  # fmt: skip
    if missing or wrong:
        raise ValueError(
            f"{folder / SHARDED} does not match the model: missing {missing[:5]}, wrong shape {wrong[:5]}; "
            "the checkpoint belongs to another model"
        )


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: which is what a 1-process run means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def broadcast_path(path: Path | None, info: DistInfo) -> Path:
    """Rank 0's `path` on every rank (the temporary folder a sharded save writes into)."""
    box = [str(path) if path is not None else None]
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def load_sharded_model(path: Path, head: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The whole model of a sharded checkpoint on one process, in eval mode (what `lmforge convert` writes out):
    every tensor is read at its full shape from the shards of all ranks, then built as `load_model` builds a
    saved model (`head` may change the task head; `dtype` casts floating tensors)."""
    from lmforge.hf.files import read_config
    from lmforge.hf.load import build_from_state, lmforge_config, meta_model, target_config, tied_aliases

    path = Path(path)
    if not is_sharded(path):
        raise FileNotFoundError(f"{path / SHARDED}/.metadata not found; {path} is not a sharded checkpoint")
    stored = lmforge_config(read_config(path), path)
    skeleton = meta_model(stored)
    aliases = tied_aliases(skeleton)
    state = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in skeleton.state_dict().items() if n not in aliases}
    _check_shapes(path, state)
    with _single_process_quiet():
        dcp.load({"model": state}, checkpoint_id=path / SHARDED, no_dist=True)
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    return build_from_state(stored, state, target_config(stored, head, {}), str(path)).eval()
