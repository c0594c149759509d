"""Saving models: lmforge's own folder (`save_model`) and a Hugging Face folder (`save_pretrained`).

lmforge's format is the smallest thing that round-trips exactly:
    config.json        {"format": "lmforge", "lmforge_version": "...", "model": config.to_dict()}
    model.safetensors  the model's state dict in our names, each tied Parameter stored once
It holds every family, the original Transformer included. A Hugging Face folder (config.json with
`architectures` and `model_type`, model.safetensors in their names, tokenizer files) is what
`transformers.AutoModelFor*.from_pretrained` reads; families without a Hugging Face twin are refused.
A model that generates also gets generation_config.json with the special token ids (`generation_token_ids`),
which `transformers`' `generate` reads to know where to stop; config.json records them too.
Both are written into a temporary folder and renamed into place (`lmforge.io.atomic_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.hf import ADAPTERS
from lmforge.hf.files import CONFIG, SAFETENSORS, check_destination, write_safetensors
from lmforge.hf.load import tied_aliases
from lmforge.io import atomic_folder

GENERATION_CONFIG = "generation_config.json"
GENERATING_HEADS = ("causal_lm", "seq2seq_lm")
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# end-of-turn tokens of the common chat templates: ChatML (Qwen, SmolLM2), Llama 3, Phi-3, Gemma
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def save_model(model: nn.Module, path: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` in lmforge's format to the folder `path` (with `tokenizer`'s files when given, see
    `save_tokenizer`); returns it. Reload with `load_model(path)` (and `load_tokenizer(path)`)."""
    from lmforge import __version__

    config = model.config
    aliases = tied_aliases(model)
    state = {n: t for n, t in model.state_dict().items() if n not in aliases}
    check_destination(Path(path), overwrite)
    with atomic_folder(path) as tmp:
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
    if config.family not in ADAPTERS:
        raise ValueError(
            f"family {config.family!r} has no Hugging Face equivalent; save it in lmforge's own format with "
            f"save_model(model, path) (CLI: lmforge convert SRC DST --to lmforge)"
        )
    adapter = ADAPTERS[config.family]
    hf_config = adapter.config_to_hf(config)
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    for key, value in generation_token_ids(tokenizer).items():
        if hf_config.get(key) is None:
            hf_config[key] = value
    generation = {key: hf_config[key] for key in GENERATION_IDS if hf_config.get(key) is not None}
    tensors = without_shared_memory(adapter.state_dict_to_hf(model.state_dict(), config))
    check_destination(Path(path), overwrite)
    with atomic_folder(path) as tmp:
        write_safetensors(tensors, tmp / SAFETENSORS)
        _write_json(tmp / CONFIG, hf_config)
        if config.head in GENERATING_HEADS and "eos_token_id" in generation:
            _write_json(tmp / GENERATION_CONFIG, generation)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    return Path(path)


def generation_token_ids(tokenizer: Any) -> dict[str, int | list[int]]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of a tokenizer, those it has. A chat model ends its turn
    with a token of its own (<|im_end|> in ChatML, <|eot_id|> in Llama 3) rather than the end-of-text one, so
    when the chat template uses a known end-of-turn token, eos is that token, followed by the tokenizer's eos
    when it differs (a list: `generate` stops at any of them), as the Hugging Face releases of such models set it."""
    if tokenizer is None:
        return {}
    ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    template = getattr(tokenizer, "chat_template", None)
    turn_ends = [t for t in END_OF_TURN_TOKENS if isinstance(template, str) and t in template]
    end = _token_id(tokenizer, turn_ends[0]) if turn_ends else None
    if end is not None and end != ids["eos_token_id"]:
        ids["eos_token_id"] = [end] if ids["eos_token_id"] is None else [end, ids["eos_token_id"]]
    return {key: value for key, value in ids.items() if value is not None}


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` in an lmforge, `tokenizers` or `transformers` tokenizer; None when it has none."""
    if hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(token)
    return tokenizer.get_vocab().get(token) if hasattr(tokenizer, "get_vocab") else None


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
