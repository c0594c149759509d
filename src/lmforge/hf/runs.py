"""The layout of a training run's checkpoints, as a file format: which folder is the newest complete checkpoint.

    run_dir/checkpoints/step_00000100/   one checkpoint (an lmforge model folder plus optimizer, scheduler,
                                         RNG and trainer_state.json; `lmforge.train.checkpoint` writes them)
                                         or, from an FSDP/TP run, config.json + sharded/ (one shard per rank,
                                         `torch.distributed.checkpoint`) in place of the weights and optimizer
    run_dir/checkpoints/latest.json      {"step", "path"}: the newest checkpoint
    run_dir/checkpoints/best.json        {"step", "path"}: the one saved as best most recently

Reading it needs no training code, so model loading (`lmforge.hf.resolve`: "load this run folder") and the
engine share this module. A checkpoint counts only when complete: its trainer state, config and weights are
all there (a save writes into a hidden folder renamed into place; a prune renames before deleting).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmforge.hf.files import CONFIG, SAFETENSORS

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of a sharded checkpoint (model + optimizer)
SHARDED_METADATA = ".metadata"  # DCP writes it last, after every rank's shard
LATEST = "latest.json"
BEST = "best.json"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


def read_pointer(path: Path) -> Path | None:
    """The complete checkpoint a latest.json / best.json names, or None (absent, unreadable, stale)."""
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    target = path.parent / str(name)
    return target if STEP_DIR.match(target.name) and is_complete(target) else None


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder holds what resuming reads first: its trainer state, config and weights
    (a folder half-deleted by an interrupted prune of an older lmforge lacks some of them)."""
    path = Path(path)
    weights = (path / SAFETENSORS).is_file() or is_sharded(path)
    return weights and all((path / name).is_file() for name in (TRAINER_STATE, CONFIG))


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder holds its weights as per-rank shards (an FSDP or tensor-parallel run)."""
    return (Path(path) / SHARDED / SHARDED_METADATA).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (temporary and incomplete folders are skipped)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one latest.json names, unless a complete checkpoint with a higher
    step exists (a kill between renaming a checkpoint into place and updating latest.json) or latest.json
    names nothing complete; None when the run has none."""
    pointed = read_pointer(Path(run_dir) / CHECKPOINTS / LATEST)
    complete = list_checkpoints(run_dir)
    newest = complete[-1] if complete else None
    if pointed is None or (newest is not None and step_of(newest) > step_of(pointed)):
        return newest
    return pointed


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint best.json names, if it still exists."""
    return read_pointer(Path(run_dir) / CHECKPOINTS / BEST)
