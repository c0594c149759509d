"""LoRA: the adapted model starts equal to the base, trains only the adapters and the head, merges exactly,
and its adapters load in peft onto the Hugging Face model (and peft's adapters into ours) with equal logits."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_trainable,
    lora_state_dict,
    merge_lora,
)
from lmforge.finetune.peft_format import load_adapter, save_adapter
from lmforge.hf import ADAPTERS
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama

PAD = 0
LENGTHS = [9, 6, 3]  # a right-padded batch: row 0 is full, rows 1 and 2 end in pads
TOL = 1e-4


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def hf_gpt2():
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD, bos_token_id=1, eos_token_id=1
    )
    return transformers.GPT2LMHeadModel(config), ADAPTERS["gpt"], GPT


def hf_llama_gqa():
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config), ADAPTERS["llama"], Llama


def hf_bert_classifier():
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=PAD,
        architectures=["BertForSequenceClassification"],
    )
    return transformers.BertForSequenceClassification(config), ADAPTERS["bert"], Bert


FAMILIES = {"gpt": hf_gpt2, "llama": hf_llama_gqa, "bert": hf_bert_classifier}
# peft's own targets (HF names) for the reverse direction: split q/k/v with a projection left out, MLPs.
PEFT_TARGETS = {
    "gpt": ["c_attn", "attn.c_proj", "c_fc"],
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}


def hf_and_ours(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random HF model (biases and norms nudged off their init) and ours loaded from it by the hf mapping."""
    torch.manual_seed(0)
    hf, adapter, model_cls = FAMILIES[family]()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.eval()
    config = adapter.config_from_hf(hf.config.to_dict())
    ours = model_cls(config).eval()
    ours.load_state_dict(adapter.state_dict_from_hf(hf.state_dict(), config), strict=True)
    return hf, ours


def logits_gap(family: str, ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """Largest logit difference on the padded batch (real tokens only for language models)."""
    ids, mask = padded_batch(97)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    if family == "bert":
        return (a - b).abs().max().item()
    return (a - b).abs()[mask.bool()].max().item()


def randomize(params) -> None:
    """Random adapter (and head) values, so equality with peft cannot come from B = 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def small_classifier(**changes) -> GPT:
    torch.manual_seed(0)
    values = dict(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=32, dropout=0.0)
    values.update(head="sequence_classification", num_labels=3, pad_token_id=PAD)
    return GPT(GPTConfig(**{**values, **changes})).eval()


def test_adapted_model_starts_equal_to_base_model():
    model = small_classifier()
    ids, mask = padded_batch(97)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    wrapped = apply_lora(model, LoRAConfig(r=4, target_modules=("qkv", "out", "fc", "proj")))
    assert len(wrapped) == 8 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert not isinstance(model.classifier.out, LoRALinear)  # the head's `out` is trained in full, not adapted
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_gradients_reach_only_adapters_and_head():
    model = small_classifier().train()
    apply_lora(model, LoRAConfig(r=2))
    ids, mask = padded_batch(97)
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert got_grad == trainable == adapters | {"classifier.out.weight"}
    assert len(adapters) == 2 * 2 * 2  # qkv and out in 2 layers, A and B each
    assert count_trainable(model) == sum(model.get_parameter(n).numel() for n in trainable)
    assert set(lora_state_dict(model)) == trainable


def test_merge_equals_adapted_model_after_training():
    model = small_classifier(dropout=0.1)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("qkv", "out", "fc")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch(97)
    model.train()
    for _ in range(4):
        optimizer.zero_grad()
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
        optimizer.step()
    model.eval()
    assert model.blocks[0].attn.qkv.lora_B.weight.abs().max() > 0  # training moved B off zero
    with torch.no_grad():
        adapted = model(ids, attention_mask=mask).logits
        merged_model = merge_lora(model)
        merged = merged_model(ids, attention_mask=mask).logits
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert type(merged_model.blocks[0].attn.qkv) is torch.nn.Linear
    assert torch.allclose(adapted, merged, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt", "llama", "bert"])
def test_saved_adapter_loads_in_peft_with_equal_logits(family, tmp_path):
    hf, ours = hf_and_ours(family)
    mlp = "down" if family == "llama" else "fc"
    apply_lora(ours, LoRAConfig(r=4, alpha=8.0, target_modules=("qkv", "out", mlp)))
    randomize(p for p in ours.parameters() if p.requires_grad)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    base = copy.deepcopy(hf)
    adapted_hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert logits_gap(family, ours, adapted_hf) <= TOL
    assert logits_gap(family, ours, base) > 1e-2  # the adapter changed the outputs


@pytest.mark.parametrize("family", ["gpt", "llama", "bert"])
def test_peft_adapter_loads_into_our_model_with_equal_logits(family, tmp_path):
    hf, ours = hf_and_ours(family)
    pristine = copy.deepcopy(hf)
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    lora = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=PEFT_TARGETS[family], task_type=task, fan_in_fan_out=family == "gpt"
    )
    peft_model = peft.get_peft_model(hf, lora).eval()
    randomize(p for p in peft_model.parameters() if p.requires_grad)  # peft's A, B and (bert) classifier
    peft_model.save_pretrained(tmp_path / "peft")

    wrapped = load_adapter(ours, tmp_path / "peft")
    assert "blocks.0.attn.qkv" in wrapped
    assert logits_gap(family, ours, peft_model) <= TOL
    # and back: the stacked adapters (rank 2r on a fused qkv) save as a peft adapter with the same outputs
    save_adapter(ours, tmp_path / "again")
    assert logits_gap(family, ours, peft.PeftModel.from_pretrained(pristine, tmp_path / "again").eval()) <= TOL


def test_unknown_target_names_it_and_the_existing_linears():
    with pytest.raises(ValueError, match=r"'q_proj'.*\['down'.*'qkv'") as error:
        apply_lora(hf_and_ours("llama")[1], LoRAConfig(target_modules=("qkv", "q_proj")))
    assert "\n" not in str(error.value)


def test_unknown_trainable_module_is_refused():
    with pytest.raises(ValueError, match="trainable module 'score'"):
        apply_lora(small_classifier(), LoRAConfig(trainable=("score",)))


def test_lora_is_not_applied_twice():
    model = small_classifier()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize(
    ("changes", "field"), [({"r": 0}, "r=0"), ({"alpha": 0}, "alpha=0"), ({"dropout": 1.0}, "dropout=1.0")]
)
def test_bad_config_values_are_refused(changes, field):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**changes)


def saved_gpt_adapter(tmp_path):
    _, ours = hf_and_ours("gpt")
    apply_lora(ours, LoRAConfig(r=2))
    return save_adapter(ours, tmp_path / "adapter")


def test_load_refuses_a_folder_without_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="not a LoRA adapter folder"):
        load_adapter(hf_and_ours("gpt")[1], tmp_path)


def test_load_refuses_another_peft_method(tmp_path):
    folder = saved_gpt_adapter(tmp_path)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="'PREFIX_TUNING' adapter, not a LoRA"):
        load_adapter(hf_and_ours("gpt")[1], folder)


def test_load_refuses_an_adapter_for_another_architecture(tmp_path):
    folder = saved_gpt_adapter(tmp_path)
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.*no Linear layer in this llama model"):
        load_adapter(hf_and_ours("llama")[1], folder)


def test_load_refuses_a_rank_or_shape_mismatch(tmp_path):
    folder = saved_gpt_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    weights[key] = torch.zeros(2, 16)  # the model's width is 32
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"lora_A \(2, 16\).*needs \(r, 32\)"):
        load_adapter(hf_and_ours("gpt")[1], folder)


def test_save_refuses_a_model_without_adapters_and_an_occupied_folder(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(small_classifier(), tmp_path / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    model = small_classifier()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="not empty"):
        save_adapter(model, tmp_path / "busy")
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a", overwrite=True)  # an adapter folder may be replaced
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
