"""Sampling defaults: a model's generation_config.json read as transformers reads it, a GGUF file's
general.sampling.* read from its header as the gguf package writes it, and the layers' precedence."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from lmforge.generate.defaults import OPENAI_DEFAULTS, SamplingDefaults, gguf_header_values, model_defaults


def test_generation_config_without_do_sample_means_greedy_as_in_transformers(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert model_defaults(tmp_path) == SamplingDefaults(temperature=0.0, eos_token_id=(2,))
    assert model_defaults(tmp_path).over(OPENAI_DEFAULTS).stream_options()["do_sample"] is False
    values = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 100}
    (tmp_path / "generation_config.json").write_text(json.dumps({**values, "eos_token_id": [128001, 128009]}))
    defaults = model_defaults(tmp_path)
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_new_tokens) == (0.6, 0.9, 20, 100)
    assert defaults.end_ids(128009) == [128009, 128001]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert model_defaults(tmp_path).temperature == 1.0  # transformers' default temperature


@pytest.mark.parametrize(
    "values, message",
    [({"temperature": "hot"}, "temperature must be int or float"), ({"top_k": True}, "top_k must be int")],
)
def test_a_generation_config_of_the_wrong_type_is_an_error_naming_file_and_field(values, message, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        model_defaults(tmp_path)


def test_no_recorded_defaults_for_a_preset_or_a_folder_without_the_file(tmp_path):
    assert model_defaults("gpt-tiny") == SamplingDefaults() == model_defaults(tmp_path)


def test_layers_take_each_field_from_the_highest_layer_that_sets_it():
    flags = SamplingDefaults(top_k=10)
    model = SamplingDefaults(temperature=0.5, top_k=20, max_new_tokens=6)
    merged = flags.over(model, OPENAI_DEFAULTS)
    assert (merged.temperature, merged.top_k, merged.top_p, merged.max_new_tokens) == (0.5, 10, 1.0, 6)
    assert SamplingDefaults(temperature=0).over(merged).stream_options() == {
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 10,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_gguf_sampling_keys_are_read_from_the_header_as_the_gguf_package_wrote_them(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "wörld"])  # skipped on the way
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.5, -2.0, 3.0])
    writer.add_sampling_temp(0.25)
    writer.add_sampling_top_k(7)
    writer.add_sampling_top_p(0.5)
    writer.add_sampling_penalty_repeat(1.5)
    writer.add_string("general.name", "tiny")
    writer.add_tensor("weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    defaults = model_defaults(path)
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.repetition_penalty) == (0.25, 7, 0.5, 1.5)
    assert defaults.min_p is None
    assert gguf_header_values(path, ("general.architecture", "general.name")) == {}  # strings are not sampling
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.sampling.top_k"].parts[-1][0] == 7
