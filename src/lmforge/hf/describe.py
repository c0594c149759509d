"""`describe_checkpoint`: what a checkpoint holds, read from file headers without loading its weights.

For a Hugging Face or lmforge folder the safetensors header gives each tensor's name, shape and dtype;
for a GGUF file the `gguf` package's reader gives them from the file's tensor table (shapes in PyTorch
order, i.e. GGML's reversed; quantised types such as Q4_1 are named, not dequantised). Parameters are
counted once per stored tensor, so a tied output matrix stored once counts once.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from lmforge.hf.files import CheckpointWeights, read_config
from lmforge.hf.load import hf_config, lmforge_config
from lmforge.hf.resolve import resolve_model

GGUF_ARRAY_PREVIEW = 8  # metadata arrays longer than this (the tokenizer's vocabulary) are summarised


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """{"path", "format", "family", "config", "parameters", "dtypes", "tensors": [{"name", "shape", "dtype"}]}
    of any model `lmforge.hf.resolve.resolve_model` finds, except a preset (a run folder: the checkpoint it
    resolves to, named by "path")."""
    path = resolve_model(path, presets=False).path
    if path.suffix == ".gguf":
        return describe_gguf(path)
    values = read_config(path)
    if values.get("format") == "lmforge":
        fmt, family, config = "lmforge", lmforge_config(values, path).family, values["model"]
    else:
        fmt, config = "huggingface", values
        try:
            family = hf_config(values, path).family
        except ValueError:  # listing the tensors of a checkpoint lmforge cannot load is still useful
            family = None
    headers = CheckpointWeights(path).headers()
    tensors = [{"name": n, "shape": list(shape), "dtype": dtype} for n, (shape, dtype) in headers.items()]
    return summary(path, fmt, family, config, tensors)


def describe_gguf(path: Path) -> dict[str, Any]:
    from lmforge.hf.gguf import open_gguf  # imported on use: only GGUF files need the gguf package

    reader = open_gguf(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if len(field.data) > GGUF_ARRAY_PREVIEW:
            metadata[key] = f"<array of {len(field.data)}>"
        else:
            value = field.contents()
            metadata[key] = value.tolist() if hasattr(value, "tolist") else value
    tensors = [
        {"name": t.name, "shape": [int(d) for d in reversed(t.shape.tolist())], "dtype": t.tensor_type.name}
        for t in reader.tensors
    ]
    return summary(path, "gguf", metadata.get("general.architecture"), metadata, tensors)


def summary(path: Path, fmt: str, family: str | None, config: dict, tensors: list[dict]) -> dict[str, Any]:
    return {
        "path": str(path),
        "format": fmt,
        "family": family,
        "config": config,
        "parameters": sum(math.prod(t["shape"]) for t in tensors),
        "dtypes": dict(Counter(t["dtype"] for t in tensors)),
        "tensors": tensors,
    }
