"""`load_model` on folders written by `transformers.save_pretrained`: every family, several configs and heads,
sharded and pickled layouts, head changes, and the bad inputs a user meets (each a clear error)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.hf.load import load_model

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PAD = 0
LLAMA = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)
GPT2 = dict(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
BERT = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=40,
    pad_token_id=PAD,
)
ROBERTA = {**BERT, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "max_position_embeddings": 42}
T5_V10 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu")
T5_V11 = {**T5_V10, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_decoder_layers": 3}

CASES = {  # id: (transformers class, config class, config fields)
    "gpt2-lm-tied": ("GPT2LMHeadModel", "GPT2Config", GPT2),
    "gpt2-lm-untied-relu": ("GPT2LMHeadModel", "GPT2Config", {**GPT2, "tie_word_embeddings": False}),
    "gpt2-base": ("GPT2Model", "GPT2Config", {**GPT2, "n_inner": 96}),
    "gpt2-seq-cls": ("GPT2ForSequenceClassification", "GPT2Config", {**GPT2, "pad_token_id": PAD, "num_labels": 3}),
    "gpt2-token-cls": ("GPT2ForTokenClassification", "GPT2Config", {**GPT2, "num_labels": 5}),
    "llama-mha-untied-theta": ("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "rope_theta": 500000.0}),
    "llama-gqa-tied-bias": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {**LLAMA, "num_key_value_heads": 2, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    ),
    "llama-mqa-head-dim": ("LlamaForCausalLM", "LlamaConfig", {**LLAMA, "num_key_value_heads": 1, "head_dim": 8}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {**LLAMA, "num_key_value_heads": 2, "sliding_window": 64}),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", "Qwen2Config", {**LLAMA, "num_key_value_heads": 2}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", "Qwen3Config", {**LLAMA, "num_key_value_heads": 2, "head_dim": 16}),
    "llama-seq-cls": ("LlamaForSequenceClassification", "LlamaConfig", {**LLAMA, "num_labels": 3}),
    "llama-token-cls": ("LlamaForTokenClassification", "LlamaConfig", {**LLAMA, "num_labels": 4}),
    "llama-qa": ("LlamaForQuestionAnswering", "LlamaConfig", LLAMA),
    "bert-base": ("BertModel", "BertConfig", BERT),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", BERT),
    "bert-seq-cls": ("BertForSequenceClassification", "BertConfig", {**BERT, "num_labels": 3}),
    "bert-token-cls-gelu-new": (
        "BertForTokenClassification",
        "BertConfig",
        {**BERT, "num_labels": 4, "hidden_act": "gelu_new"},
    ),
    "bert-qa": ("BertForQuestionAnswering", "BertConfig", BERT),
    "roberta-base": ("RobertaModel", "RobertaConfig", ROBERTA),
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", ROBERTA),
    "roberta-seq-cls": ("RobertaForSequenceClassification", "RobertaConfig", {**ROBERTA, "num_labels": 2}),
    "t5-v1.0": ("T5ForConditionalGeneration", "T5Config", T5_V10),
    "t5-v1.1": ("T5ForConditionalGeneration", "T5Config", T5_V11),
    "t5-base-model": ("T5Model", "T5Config", T5_V10),
}


def make_hf(case: str) -> torch.nn.Module:
    """A random-weight transformers model; biases and norm gains perturbed (HF starts them at 0 and 1)."""
    model_class, config_class, fields = CASES[case]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def padded_batch(vocab_size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows of 9, 6 and 2 real tokens (ids in [3, vocab), never a special id)."""
    ids = torch.randint(3, vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(9)[None, :] < torch.tensor([[9], [6], [2]])).long()
    return ids.masked_fill(mask == 0, pad), mask


def outputs(model: torch.nn.Module, hf: bool, ids: torch.Tensor, mask: torch.Tensor, t5: bool) -> torch.Tensor:
    """The head's output (B, T, ...) or (B, labels), or the last hidden state of a bare model; pad positions
    of token-level outputs zeroed (they are not defined the same way by both)."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if t5:
        kwargs.update(decoder_input_ids=ids[:, :5], decoder_attention_mask=mask[:, :5])
        mask = mask[:, :5]
    with torch.no_grad():
        out = model(**kwargs)
    if hf and hasattr(out, "start_logits"):
        value = torch.stack([out.start_logits, out.end_logits], dim=-1)
    else:
        value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if value.dim() == 2:
        return value
    return value * mask[..., None]


@pytest.mark.parametrize("case", list(CASES))
def test_loads_transformers_folder_with_identical_outputs(case, tmp_path):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.training
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else PAD
    ids, mask = padded_batch(hf.config.vocab_size, pad)
    t5 = case.startswith("t5")
    expected, got = outputs(hf, True, ids, mask, t5), outputs(ours, False, ids, mask, t5)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    if case.endswith("tied") or case in ("bert-mlm", "roberta-mlm", "t5-v1.0"):
        head = ours.lm_head.decoder if case.endswith("mlm") else ours.lm_head
        embedding = ours.shared if case.startswith("t5") else ours.tok_emb
        assert head.weight is embedding.weight


def test_bert_base_model_pooler_matches(tmp_path):
    hf = make_hf("bert-base")
    hf.save_pretrained(tmp_path)
    ids, mask = padded_batch(99, PAD)
    with torch.no_grad():
        diff = load_model(tmp_path)(ids, attention_mask=mask).pooler_output - hf(ids, attention_mask=mask).pooler_output
    assert diff.abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["gpt2-lm-tied", "llama-gqa-tied-bias", "bert-mlm", "t5-v1.1"])
def test_sharded_safetensors_and_pickled_bin_load_the_same(case, tmp_path):
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    # transformers 5 writes only safetensors; a .bin checkpoint is the state dict torch.save wrote (transformers 4)
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    reference = load_model(tmp_path / "single").state_dict()
    for layout in ("sharded", "bin"):
        state = load_model(tmp_path / layout).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[n], reference[n]) for n in reference), layout


def test_new_head_keeps_backbone_and_reports_new_and_dropped_tensors(tmp_path):
    make_hf("bert-mlm").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="newly initialised") as caught:
        clf = load_model(tmp_path, head="sequence_classification", num_labels=3)
    message = str(caught[0].message)
    for name in ("classifier.out.weight", "classifier.out.bias", "pooler.weight", "lm_head.dense.weight"):
        assert name in message
    assert "tok_emb.weight" not in message  # the backbone is kept
    mlm = load_model(tmp_path)
    ids, mask = padded_batch(99, PAD)
    with torch.no_grad():
        a, b = clf(ids, attention_mask=mask), mlm(ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert a.logits.shape == (3, 3)
    assert clf.classifier.out.weight.std().item() == pytest.approx(0.02, rel=0.3)  # BERT's init, not garbage


def test_new_head_on_tied_decoder_drops_nothing_but_the_head(tmp_path):
    make_hf("gpt2-lm-untied-relu").save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"dropped from the checkpoint: \['lm_head.weight'\]"):
        model = load_model(tmp_path, head="token_classification", num_labels=2)
    assert model.config.head == "token_classification"


def test_dtype_casts_floating_weights(tmp_path):
    make_hf("llama-gqa-tied-bias").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.tok_emb.weight
    with pytest.raises(ValueError, match="dtype='float8' is not supported"):
        load_model(tmp_path, dtype="float8")


# --- bad input ----------------------------------------------------------------------------------------------


def saved(case: str, folder: Path) -> Path:
    make_hf(case).save_pretrained(folder)
    return folder


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    folder = saved("gpt2-lm-tied", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(ValueError, match=r"model_type='falcon'.*supported: \['bert', 'gpt2', 'llama'"):
        load_model(folder)


def test_missing_config_and_missing_weights_name_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        load_model(tmp_path)
    folder = saved("gpt2-lm-tied", tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors.*pytorch_model\.bin"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_model(folder)


def test_sharded_index_naming_a_missing_shard_is_an_error(tmp_path):
    folder = tmp_path / "ckpt"
    make_hf("gpt2-lm-tied").save_pretrained(folder, max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} not found; model.safetensors.index.json lists it"):
        load_model(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_file_is_named_and_nothing_loads(damage, tmp_path):
    folder = saved("llama-mha-untied-theta", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a safetensors file" * 8)
    with pytest.raises(ValueError, match=rf"{path}.*truncated or corrupt"):
        load_model(folder)


def test_pickled_object_in_bin_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = saved("gpt2-lm-tied", tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors.*weights_only=True"):
        load_model(folder)
    assert not marker.exists()
    torch.save({**state, "step": 3}, folder / "pytorch_model.bin")  # loadable safely, but not a state dict
    with pytest.raises(ValueError, match=r"entries that are not tensors: \['step'\]"):
        load_model(folder)


def test_missing_unexpected_and_misshaped_tensors_are_each_named(tmp_path):
    folder = saved("llama-mha-untied-theta", tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_model(folder)
    assert "layers.1.mlp.up_proj.weight" in str(error.value) and "layers.0.extra.weight" in str(error.value)

    state = load_file(saved("llama-mha-untied-theta", tmp_path / "b") / "model.safetensors")
    state["model.norm.weight"] = torch.ones(65)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.ones(64, 32)
    save_file(state, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="wrong shape") as error:
        load_model(tmp_path / "b")
    assert "model.norm.weight: expected (64,), found (65,)" in str(error.value)
    assert "model.layers.0.self_attn.o_proj.weight: expected (64, 64), found (64, 32)" in str(error.value)


def test_config_that_disagrees_with_weights_names_the_tensors(tmp_path):
    folder = saved("bert-seq-cls", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight: expected \(100, 64\), found \(128, 64\)"):
        load_model(folder)


def test_config_missing_a_required_key_names_it(tmp_path):
    folder = saved("bert-base", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json lacks 'hidden_size', which bert configs need"):
        load_model(folder)


def test_a_file_path_or_unknown_head_is_a_clear_error(tmp_path):
    folder = saved("t5-v1.0", tmp_path / "t5")
    with pytest.raises(ValueError, match="is a file"):
        load_model(folder / "config.json")
    with pytest.raises(ValueError, match=r"head='causal_lm' is not allowed for family 't5'"):
        load_model(folder, head="causal_lm")
    shutil.rmtree(folder)


@pytest.mark.parametrize(
    "case, key, value, message",
    [
        ("gpt2-lm-tied", "n_embd", None, "n_embd is null; expected an integer"),
        ("llama-mha-untied-theta", "num_attention_heads", None, "num_attention_heads is null; expected an integer"),
        ("llama-mha-untied-theta", "rms_norm_eps", "small", 'rms_norm_eps is the string "small"; expected a number'),
        ("bert-base", "hidden_size", None, "hidden_size is null; expected an integer"),
        ("t5-v1.0", "num_layers", [2], "num_layers is a list; expected an integer"),
    ],
)
def test_a_null_or_wrongly_typed_config_value_names_the_file_and_the_field(case, key, value, message, tmp_path):
    folder = saved(case, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError) as error:
        load_model(folder)
    assert str(error.value) == f"{folder / 'config.json'}: {message}"


def test_a_config_too_large_for_memory_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    from lmforge.models import build as build_module

    built, real = [], build_module.meta_model
    monkeypatch.setattr(build_module, "meta_model", lambda config: built.append(config.n_layer) or real(config))
    folder = saved("llama-mha-untied-theta", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1_000_000_000}))
    with pytest.raises(ValueError, match=r"config\.json: llama config with n_layer=1000000000 .*of memory available"):
        load_model(folder)
    assert max(built) <= 2  # measured on one- and two-layer models: nothing of full depth was built
