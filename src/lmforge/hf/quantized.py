"""Quantised checkpoints: lmforge's folder format with the quantised tensors and their recipe.

    config.json        {"format": "lmforge", ..., "model": config, "quantization": {"method": "int4",
                        "group_size": 64, "gptq": true, "modules": ["blocks.0.attn.qkv", ...]}}
    model.safetensors  the float tensors as `save_model` writes them, and for each listed module the layer's
                       own buffers: int8 `weight` + `scale` (int8 per channel), or uint8 `weight` (two 4-bit
                       codes a byte) + `scale` + `zero` per group (int4); see `lmforge.nn.quant`

Loading builds the model without initialising it, swaps each listed Linear for the empty quantised layer of
the method (`lmforge.nn.quant.SHELLS`), and assigns the file's tensors: the same modules, the same bits, so
the same outputs as the model that was saved. `load_model` reads these folders like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.hf.files import CONFIG, SAFETENSORS, CheckpointWeights, check_destination, write_safetensors
from lmforge.io import atomic_folder
from lmforge.models import FAMILIES, config_from_dict
from lmforge.models.build import no_init
from lmforge.nn.quant import SHELLS


def save_quantized(
    model: nn.Module,
    path: str | Path,
    quantization: dict[str, Any],
    tokenizer: Any = None,
    overwrite: bool = False,
    side_files: tuple[Path, ...] = (),
) -> Path:
    """Write a model whose `quantization["modules"]` are quantised layers, with `tokenizer`'s files and copies
    of `side_files` (a fine-tuned model's task.json, which `lmforge evaluate` and `predict` read)."""
    from lmforge import __version__
    from lmforge.hf.load import tied_aliases
    from lmforge.hf.save import save_tokenizer

    aliases = tied_aliases(model)
    state = {n: t for n, t in model.state_dict().items() if n not in aliases}
    config = {
        "format": "lmforge",
        "lmforge_version": __version__,
        "model": model.config.to_dict(),
        "quantization": quantization,
    }
    check_destination(Path(path), overwrite)
    with atomic_folder(path) as tmp:
        write_safetensors(state, tmp / SAFETENSORS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for file in side_files:
            (tmp / file.name).write_bytes(file.read_bytes())
    return Path(path)


def load_quantized(values: dict[str, Any], folder: Path) -> nn.Module:
    """The quantised model of an lmforge folder whose config.json has a "quantization" entry (eval mode)."""
    from lmforge.hf.load import tied_aliases

    quantization = values["quantization"]
    method = quantization.get("method")
    if method not in SHELLS:
        raise ValueError(f"{folder / CONFIG}: quantization method {method!r} is unknown; lmforge reads {list(SHELLS)}")
    try:
        config = config_from_dict(values["model"], where="model.")
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(f"{folder / CONFIG}: {error}") from None
    with no_init():
        model = FAMILIES[config.family][1](config)
    aliases = tied_aliases(model)
    for name in quantization["modules"]:
        owner, _, attr = name.rpartition(".")
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{folder / CONFIG}: quantized module {name} is not a Linear of {config.family}")
        setattr(model.get_submodule(owner), attr, SHELLS[method](linear, quantization))
    state = CheckpointWeights(folder).load()
    expected = {n for n in model.state_dict() if n not in aliases}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: tensors do not match the quantised model: missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    for alias, primary in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(primary))
    return model.eval()
