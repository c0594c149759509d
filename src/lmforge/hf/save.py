"""Saving models: lmforge's own folder (`save_model`) and a Hugging Face folder (`save_pretrained`).

lmforge's format is the smallest thing that round-trips exactly:
    config.json        {"format": "lmforge", "lmforge_version": "...", "model": config.to_dict()}
    model.safetensors  the model's state dict in our names, each tied Parameter stored once
It holds every family, the original Transformer included. A Hugging Face folder (config.json with
`architectures` and `model_type`, model.safetensors in their names, tokenizer files) is what
`transformers.AutoModelFor*.from_pretrained` reads; families without a Hugging Face twin are refused.
Both are written into a temporary folder and renamed into place (`atomic_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.hf.files import CONFIG, SAFETENSORS, atomic_folder, write_safetensors
from lmforge.hf.load import FAMILY_MAPPINGS, tied_aliases


def save_model(model: nn.Module, path: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` in lmforge's format to the folder `path` (with `tokenizer`'s files when given, see
    `save_tokenizer`); returns it. Reload with `load_model(path)` (and `load_tokenizer(path)`)."""
    from lmforge import __version__

    config = model.config
    aliases = tied_aliases(model)
    state = {n: t for n, t in model.state_dict().items() if n not in aliases}
    with atomic_folder(Path(path), overwrite) as tmp:
        write_safetensors(state, tmp / SAFETENSORS)
        _write_json(tmp / CONFIG, {"format": "lmforge", "lmforge_version": __version__, "model": config.to_dict()})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return Path(path)


def save_pretrained(model: nn.Module, path: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` as a Hugging Face folder that `transformers.AutoModelFor*.from_pretrained` loads with
    the same outputs; `tokenizer` (anything with `save_pretrained(dir)` or `save(dir)`, or a
    `tokenizers.Tokenizer`) is saved next to it. Returns `path`."""
    config = model.config
    if config.family not in FAMILY_MAPPINGS:
        raise ValueError(
            f"family {config.family!r} has no Hugging Face equivalent; save it in lmforge's own format with "
            f"save_model(model, path) (CLI: lmforge convert SRC DST --to lmforge)"
        )
    mapping = FAMILY_MAPPINGS[config.family]
    hf_config = mapping.config_to_hf(config)
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tensors = without_shared_memory(mapping.state_dict_to_hf(model.state_dict(), config))
    with atomic_folder(Path(path), overwrite) as tmp:
        write_safetensors(tensors, tmp / SAFETENSORS)
        _write_json(tmp / CONFIG, hf_config)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return Path(path)


def without_shared_memory(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies (the same storage, offset and shape as an earlier tensor: Hugging Face re-ties
    them from the config) and clone views that only overlap another tensor's memory (e.g. q of a split qkv),
    since safetensors stores each byte once."""
    kept: dict[str, torch.Tensor] = {}
    seen_views, seen_storages = set(), set()
    for name, t in tensors.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if view in seen_views:
            continue
        storage = t.untyped_storage().data_ptr()
        kept[name] = t.clone() if storage in seen_storages else t
        seen_views.add(view)
        seen_storages.add(storage)
    return kept


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Use the tokenizer's own writer: save_pretrained(dir) (transformers, lmforge), tokenizers.Tokenizer's
    save(file) as tokenizer.json, else save(dir)."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
        return
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(str(folder / "tokenizer.json"))
    elif hasattr(tokenizer, "save"):
        tokenizer.save(folder)
    else:
        raise ValueError(
            f"cannot save a tokenizer of type {type(tokenizer).__name__}: it has neither save_pretrained(dir) "
            f"nor save(dir); pass a tokenizers.Tokenizer, a transformers tokenizer or an lmforge tokenizer"
        )


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")
