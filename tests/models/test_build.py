"""`build_model` guards every command: a config of the wrong types, or one whose weights cannot fit in memory,
is refused with one line before anything is allocated; sizes of absurd configs are computed, not built."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import PRESETS, build_config, build_model, config_from_dict, model_stats
from lmforge.models import build as build_module
from lmforge.models.build import meta_model, parameter_memory
from lmforge.models.stats import count_parameters


@pytest.mark.parametrize(
    "values, message",
    [
        ({"family": "gpt", "d_model": None}, "d_model is null; expected an integer"),
        ({"family": "gpt", "n_layer": "2"}, 'n_layer is the string "2"; expected an integer'),
        ({"family": "gpt", "n_layer": True}, "n_layer is true; expected an integer"),
        ({"family": "llama", "rope_theta": "big"}, 'rope_theta is the string "big"; expected a number'),
        ({"family": "llama", "rope_scaling": [1]}, "rope_scaling is a list; expected an object or null"),
        ({"family": "gpt", "bias": 1}, "bias is the number 1; expected true or false"),
        ({"family": "t5", "activation": None}, "activation is null; expected a string"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)
    family = values["family"]
    with pytest.raises(ValueError, match=message):
        build_model(family, **{k: v for k, v in values.items() if k != "family"})


def test_numbers_where_floats_go_and_nulls_where_allowed_are_accepted():
    config = config_from_dict({"family": "llama", "rope_theta": 10000, "n_kv_heads": None, "dropout": 0})
    assert config.rope_theta == 10000


def _spy_on_built_layers(monkeypatch) -> list[int]:
    """The layer counts of every weightless model built while measuring: they must stay tiny."""
    built, real = [], build_module.meta_model

    def spy(config):
        built.append(config.n_layer)
        return real(config)

    monkeypatch.setattr(build_module, "meta_model", spy)
    return built


def test_a_billion_layers_are_refused_at_once_naming_the_value_and_the_memory(monkeypatch):
    built = _spy_on_built_layers(monkeypatch)
    with pytest.raises(ValueError) as error:
        build_model("gpt-tiny", n_layer=1_000_000_000)
    assert built and max(built) <= 2  # measured from one- and two-layer models, never built at full depth
    text = str(error.value)
    assert "gpt config with n_layer=1000000000 (the default is 12) has " in text and "of memory available" in text
    assert text.endswith("lower n_layer") and "\n" not in text


def test_a_model_larger_than_the_memory_left_on_its_device_is_refused(monkeypatch):
    assert build_module.available_memory(torch.device("meta")) is None  # shapes only: no memory to run out of
    assert build_module.available_memory(torch.device("cpu")) > 0
    devices = []
    monkeypatch.setattr(build_module, "available_memory", lambda device: devices.append(device.type) or 1 << 20)
    with pytest.raises(ValueError, match=r"gpt config with n_layer=4, d_model=128, .* 1\.0 MB of memory available"):
        build_model("gpt-tiny")
    assert devices == ["cpu"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counts_from_one_and_two_layers_equal_the_whole_models(name):
    config = build_config(name, n_layer=3)
    whole = meta_model(config)
    elements = count_parameters(whole) + sum(b.numel() for b in whole.buffers())
    assert parameter_memory(config, torch.float32) == (count_parameters(whole), elements * 4)
    assert model_stats(config, seq_len=64)["parameters"] == count_parameters(whole)


def test_stats_of_an_absurd_config_are_computed_without_building_it(monkeypatch):
    built = _spy_on_built_layers(monkeypatch)
    stats = model_stats(build_config("gpt2", n_layer=1_000_000_000))
    assert not built or max(built) <= 2
    one, two = (model_stats(build_config("gpt2", n_layer=n))["parameters"] for n in (1, 2))
    assert stats["parameters"] == one + (10**9 - 1) * (two - one)
