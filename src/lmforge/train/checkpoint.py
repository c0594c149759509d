"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of `run_dir/checkpoints/`:
    step_00000100/
        config.json, model.safetensors   the model in lmforge's format (`lmforge.load_model(dir)` reads it)
        optimizer.pt, scheduler.pt       torch.save of their state_dict()s (tensors and plain containers)
        rng.pt                           torch's CPU generator state (+ one per CUDA device)
        loss.safetensors                 the loss's own weights, when it has any (`Objective.loss_module`)
        tokenizer files                  when a tokenizer is given
        trainer_state.json               {"step", "state": the trainer's dict, "python_rng", "numpy_rng"}
        sharded/                         FSDP/TP runs only, in place of model.safetensors and optimizer.pt:
                                         each rank's shards of both (`lmforge.train.sharded`, DCP)
    latest.json                          {"step", "path"}: the newest checkpoint
    best.json                            {"step", "path"}: the one saved with is_best=True most recently

A checkpoint is complete only when its folder exists under its final name and holds trainer_state.json:
every file is written into a hidden temporary folder in the same parent, trainer_state.json last, each
flushed to disk, and the folder is renamed into place (`lmforge.io.atomic_folder`), before
latest.json is updated. A run killed at any moment leaves either the previous complete checkpoint or the
new one, never a half-written folder under a step name. A sharded save is the same, every rank writing its shards
into rank 0's temporary folder before rank 0 writes the rest and renames it. Everything is read back without
unpickling code: safetensors for weights, torch.load(weights_only=True) for the optimizer, scheduler and RNG
states (DCP's shards hold tensors and plain containers).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.hf.files import CONFIG, SAFETENSORS, CheckpointWeights, read_config, write_safetensors
from lmforge.hf.load import tied_aliases
from lmforge.hf.runs import (
    BEST,
    CHECKPOINTS,
    LATEST,
    TRAINER_STATE,
    is_complete,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    read_pointer,
)
from lmforge.hf.save import save_tokenizer
from lmforge.io import atomic_folder, write_json_atomic
from lmforge.train.distributed import DistInfo, unwrap_model
from lmforge.train.sharded import broadcast_path, read_sharded, write_sharded

OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
LOSS_WEIGHTS = "loss.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


# ---------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    trainer_state: dict,
    tokenizer: Any = None,
    keep_last: int = 3,
    is_best: bool = False,
    loss_module: nn.Module | None = None,
    sharded: bool = False,
    info: DistInfo | None = None,
) -> Path:
    """Write run_dir/checkpoints/step_{step:08d}/ atomically, prune to the last `keep_last` checkpoints
    (plus the best), then point latest.json at it; returns its path. `trainer_state` must be
    JSON-serialisable (loader position, best metric, ...). Re-saving an existing step replaces it.
    `loss_module`'s weights (the loss's own parameters) go to loss.safetensors, beside the model's.

    `sharded=True` (FSDP/TP) is collective: every rank of `info` calls it; each writes its shards of model and
    optimizer into rank 0's temporary folder, and only rank 0 writes the other files, renames and prunes."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1 (the checkpoint just written is always kept)")
    try:
        state_text = json.dumps(
            {"step": step, "state": trainer_state, "python_rng": _python_rng(), "numpy_rng": _numpy_rng()},
            indent=2, allow_nan=False,
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"trainer_state must hold JSON values only (finite numbers, str, list, dict): {error}"
        ) from None

    model = unwrap_model(model)
    final = checkpoint_dir(run_dir, step)
    if sharded and info is not None and not info.is_main:
        write_sharded(broadcast_path(None, info), model, optimizer)
        return final
    try:
        with atomic_folder(final) as tmp:
            if sharded:
                write_sharded(broadcast_path(tmp, info) if info is not None else tmp, model, optimizer)
                _write_config(model, tmp)
            else:
                _write_model(model, tmp)
                if optimizer is not None:
                    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp)
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            torch.save(_torch_rng(), tmp / RNG)
            if loss_module is not None:
                write_safetensors(loss_module.state_dict(), tmp / LOSS_WEIGHTS)
            (tmp / TRAINER_STATE).write_text(state_text + "\n", encoding="utf-8")  # last: marks it complete
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        if not _is_disk_error(error):
            raise
        previous = latest_checkpoint(run_dir)
        kept = f"the last complete checkpoint is {previous}" if previous else "no earlier checkpoint exists"
        free = shutil.disk_usage(final.parent).free / 1e9 if final.parent.exists() else 0.0
        raise RuntimeError(
            f"disk full (or not writable) while writing checkpoint {final} ({free:.2f} GB free); {kept}. Free "
            "some space or choose another train.out, then continue with --resume"
        ) from None

    if is_best:
        _write_pointer(final.parent / BEST, step, final)
    _write_pointer(final.parent / LATEST, step, final)  # before pruning: a kill while pruning keeps this one
    _prune(final.parent, keep_last, keep=final)
    return final


def _is_disk_error(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES)
    text = str(error).lower()
    return "no space" in text or "file write failed" in text or "unexpected pos" in text


def _write_model(model: nn.Module, folder: Path) -> None:
    """config.json + model.safetensors exactly as `lmforge.save_model` writes them (tied weights once)."""
    _write_config(model, folder)
    aliases = tied_aliases(model)
    write_safetensors({n: t for n, t in model.state_dict().items() if n not in aliases}, folder / SAFETENSORS)


def _write_config(model: nn.Module, folder: Path) -> None:
    from lmforge import __version__

    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ValueError(
            f"cannot checkpoint a {type(model).__name__}: it has no lmforge `config`; build it with build_model()"
        )
    config = {"format": "lmforge", "lmforge_version": __version__, "model": model.config.to_dict()}
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_pointer(path: Path, step: int, target: Path) -> None:
    write_json_atomic(path, {"step": step, "path": target.name}, indent=None)


def _prune(folder: Path, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints older than the last `keep_last` (by step), sparing `keep` and the best,
    and leftovers of interrupted saves or prunes (hidden folders: one process writes a run's checkpoints).

    Each doomed checkpoint is first renamed to a hidden `.step_N.pruning` name, in one atomic step, and only
    then deleted: a kill in the middle of the deletion leaves a hidden folder the next prune removes, never a
    half-deleted folder under a step name that looks like a checkpoint."""
    best = read_pointer(folder / BEST)
    complete = list_checkpoints(folder.parent)
    spared = {p.name for p in complete[-keep_last:]} | {keep.name} | ({best.name} if best else set())
    for path in complete:
        if path.name not in spared:
            doomed = path.with_name(f".{path.name}.pruning")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for path in folder.iterdir():
        if path.name.startswith(".step_") and any(m in path.name for m in (".tmp-", ".old-", ".pruning")):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- loading


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    allow_config_changes: tuple[str, ...] = (),
    loss_module: nn.Module | None = None,
) -> dict:
    """Copy a checkpoint's weights into `model` (and the optimizer's and scheduler's states when given, and
    `loss_module`'s weights from loss.safetensors), restore the RNGs, and return the trainer state: the dict
    given to save_checkpoint, plus "step".

    The checkpoint's model config must equal model.config field by field, except the fields named in
    `allow_config_changes` (e.g. ("dropout", "attention")); a difference is refused, naming each field.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found; expected a folder like run/checkpoints/step_00000100")
    if not is_complete(path):
        raise ValueError(
            f"checkpoint {path} is incomplete (no {TRAINER_STATE}: the save was interrupted); "
            f"resume from an earlier checkpoint, e.g. the one run/checkpoints/{LATEST} names"
        )
    model = unwrap_model(model)
    _check_config(path, model, allow_config_changes)
    if is_sharded(path):  # written by FSDP/TP ranks: DCP reads it into this layout, whatever it is
        read_sharded(path, model, optimizer)
    elif any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            f"checkpoint {path} holds whole weights (a ddp run's) and this model is sharded; resume it with "
            "train.parallel=ddp, or start a new sharded run from its weights with --model.name=<that folder>"
        )
    else:
        _load_weights(path, model)
        if optimizer is not None:
            _load_state(path / OPTIMIZER, optimizer, "optimizer")
    if loss_module is not None:
        _load_loss_weights(path, loss_module)
    if scheduler is not None:
        _load_state(path / SCHEDULER, scheduler, "scheduler")
    saved = _read_trainer_state(path)
    if restore_rng:
        _restore_rng(path, saved)
    state = dict(saved.get("state") or {})
    state["step"] = saved["step"]
    return state


def _check_config(path: Path, model: nn.Module, allowed: tuple[str, ...]) -> None:
    values = read_config(path)
    stored = values.get("model")
    if values.get("format") != "lmforge" or not isinstance(stored, dict):
        raise ValueError(f"{path / CONFIG} is not an lmforge checkpoint config (format 'lmforge' with 'model')")
    current = model.config.to_dict()
    differing = [
        f"{key}: checkpoint {stored.get(key)!r}, model {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if key not in allowed and stored.get(key) != current.get(key)
    ]
    if differing:
        raise ValueError(
            f"checkpoint {path} was saved from a different model config ({'; '.join(differing)}); "
            f"build the model with the checkpoint's config (lmforge.load_model({str(path)!r}) reads it)"
        )


def _load_weights(path: Path, model: nn.Module) -> None:
    if not (path / SAFETENSORS).is_file():
        raise FileNotFoundError(f"{path / SAFETENSORS} not found; the checkpoint is incomplete")
    state = CheckpointWeights(path).load()  # a truncated or corrupt file raises ValueError naming it
    aliases = tied_aliases(model)
    expected = {n: t for n, t in model.state_dict().items() if n not in aliases}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n}: {tuple(state[n].shape)} vs {tuple(t.shape)}" for n, t in expected.items()
             if n in state and state[n].shape != t.shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path / SAFETENSORS} does not match the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shape {wrong}; the checkpoint belongs to another model"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])  # in place: the optimizer keeps referring to the same Parameters


def _load_loss_weights(path: Path, module: nn.Module) -> None:
    """The loss's own weights, in place; names and shapes must match exactly."""
    file = path / LOSS_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: the checkpoint was saved by a run whose loss had no weights of its own; resume with "
            "the loss settings that run used (e.g. the same distillation weights and student width)"
        )
    state = load_file(str(file))
    expected = module.state_dict()
    if set(state) != set(expected) or any(state[n].shape != t.shape for n, t in expected.items()):
        raise ValueError(
            f"{file} holds {sorted((n, tuple(t.shape)) for n, t in state.items())}, the loss "
            f"{sorted((n, tuple(t.shape)) for n, t in expected.items())}; resume with the loss settings the run used"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def _torch_load(file: Path, what: str) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; the checkpoint has no {what} state (it was saved without one)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{file} could not be read as a {what} state ({reason}); it is corrupt or holds Python objects "
            f"(read only with torch.load(weights_only=True)); resume from another checkpoint"
        ) from None


def _load_state(file: Path, target: Any, what: str) -> None:
    state = _torch_load(file, what)
    if isinstance(target, torch.optim.Optimizer):
        _check_optimizer_state(file, state, target)
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"{file} does not fit this {what} ({error}); build the {what} with the settings the run used"
        ) from None


def _check_optimizer_state(file: Path, state: Any, optimizer: torch.optim.Optimizer) -> None:
    """torch's load_state_dict only compares group and parameter counts; also require the same kind of groups
    (their option names and roles: an AdamW state must not land in Muon) and moment tensors shaped like
    the parameters they belong to."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise ValueError(f"{file} does not hold an optimizer state_dict (no 'param_groups')")
    saved = [(sorted(set(g) - {"params"}), g.get("role")) for g in state["param_groups"]]
    current = [(sorted(set(g) - {"params"}), g.get("role")) for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(
            f"{file} does not fit this optimizer (saved groups {[r for _, r in saved]} with options "
            f"{[k for k, _ in saved[:1]]}, this one {[r for _, r in current]} with {[k for k, _ in current[:1]]}); "
            f"build the optimizer with the settings the run used"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, values in state.get("state", {}).items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                raise ValueError(
                    f"{file}: state {name!r} of parameter {index} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(params[index].shape)}; the checkpoint belongs to another model or optimizer"
                )


def _read_trainer_state(path: Path) -> dict:
    file = path / TRAINER_STATE
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); resume from another checkpoint") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise ValueError(f"{file} has no integer 'step'; it was not written by save_checkpoint")
    return saved


# ---------------------------------------------------------------- random number generators


def _torch_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng() -> list:
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _numpy_rng() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def _restore_rng(path: Path, saved: dict) -> None:
    """Put every generator back where it was at save time, so the next draws repeat the uninterrupted run."""
    rng = _torch_load(path / RNG, "random number generator")
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise ValueError(f"{path / RNG} does not hold a torch RNG state; resume from another checkpoint")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    try:
        version, internal, gauss_next = saved["python_rng"]
        random.setstate((version, tuple(internal), gauss_next))
        n = saved["numpy_rng"]
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / TRAINER_STATE} has a malformed RNG state ({error})") from None


# ---------------------------------------------------------------- disk


def check_writable(run_dir: Path, min_free_bytes: int) -> None:
    """Fail before step 1 rather than at the first checkpoint: create `run_dir`, write and delete a probe
    file in it, and require `min_free_bytes` free on its filesystem (see `checkpoint_bytes`)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        raise RuntimeError(
            f"cannot write to run directory {run_dir} ({error.strerror or error}); choose a writable output folder"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < min_free_bytes:
        raise RuntimeError(
            f"only {free / 1e9:.2f} GB free under {run_dir}, but checkpoints need about {min_free_bytes / 1e9:.2f} GB; "
            f"free some space or choose another output folder (train.out)"
        )


def checkpoint_bytes(model: nn.Module, optimizer_states_per_param: int = 2) -> int:
    """About how large one checkpoint is: the weights plus the optimizer's per-parameter states
    (AdamW keeps two: m and v; Muon one for its matrices), all in the weights' dtype."""
    weights = sum(p.numel() * p.element_size() for p in unwrap_model(model).parameters())
    return weights * (1 + optimizer_states_per_param)
