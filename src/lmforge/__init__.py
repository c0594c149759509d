"""lmforge: build Transformer models from scratch, pretrain, fine-tune, evaluate and serve them."""

from lmforge.models import (
    FAMILIES,
    PRESETS,
    ModelConfig,
    ModelOutput,
    build_config,
    build_model,
    config_from_dict,
    count_parameters,
    flops_per_token,
    model_stats,
)

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ModelConfig",
    "ModelOutput",
    "__version__",
    "build_config",
    "build_model",
    "config_from_dict",
    "count_parameters",
    "flops_per_token",
    "model_stats",
]
