"""lmforge: build Transformer models from scratch, pretrain, fine-tune, evaluate and serve them.

The names below are imported on first use (PEP 562), so `import lmforge` and commands that need no model
(`lmforge data ...`) start without loading PyTorch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FAMILIES": "lmforge.models",
    "PRESETS": "lmforge.models",
    "ModelConfig": "lmforge.models",
    "ModelOutput": "lmforge.models",
    "build_config": "lmforge.models",
    "build_model": "lmforge.models",
    "config_from_dict": "lmforge.models",
    "count_parameters": "lmforge.models",
    "flops_per_token": "lmforge.models",
    "model_stats": "lmforge.models",
    "Tokenizer": "lmforge.data.tokenizers.tokenizer",
    "load_tokenizer": "lmforge.data.tokenizers.tokenizer",
    "gpt2_tokenizer": "lmforge.data.tokenizers.tokenizer",
    "load_gguf": "lmforge.hf.gguf",
    "load_model": "lmforge.hf.load",
    "save_model": "lmforge.hf.save",
    "save_pretrained": "lmforge.hf.save",
    "describe_checkpoint": "lmforge.hf.describe",
    "load_dataset": "lmforge.data.corpora.catalog",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
