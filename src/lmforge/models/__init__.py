"""Model families, heads, presets and `build_model`."""

from lmforge.models.build import FAMILIES, build_config, build_model, config_from_dict, family_of
from lmforge.models.config import ModelConfig
from lmforge.models.output import ModelOutput
from lmforge.models.presets import PRESETS
from lmforge.models.stats import count_parameters, flops_per_token, model_stats

__all__ = [
    "FAMILIES",
    "PRESETS",
    "ModelConfig",
    "ModelOutput",
    "build_config",
    "build_model",
    "config_from_dict",
    "family_of",
    "count_parameters",
    "flops_per_token",
    "model_stats",
]
