"""Freezing embeddings and lower layers, and layer-wise learning-rate decay groups."""

from __future__ import annotations

import pytest
import torch

from lmforge.finetune.freeze import freeze, layerwise_lr_groups
from lmforge.finetune.lora import LoRAConfig, apply_lora
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig

SMALL = dict(vocab_size=97, max_seq_len=32, n_layer=3, n_head=4, d_model=32)


def gpt_classifier() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL, head="sequence_classification", num_labels=3, pad_token_id=0))


def bert_classifier() -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(**SMALL, d_ff=64, head="sequence_classification", num_labels=3))


def numel(model: torch.nn.Module, *prefixes: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def test_freeze_counts_and_stops_gradients_to_embeddings_and_first_layers():
    model = gpt_classifier()
    frozen = freeze(model, embeddings=True, first_n_layers=2)
    assert frozen == numel(model, "tok_emb.", "pos_emb.", "blocks.0.", "blocks.1.")
    ids = torch.randint(1, 97, (2, 7))
    model(ids, labels=torch.tensor([0, 2])).loss.backward()
    for name, p in model.named_parameters():
        lower = name.startswith(("tok_emb.", "pos_emb.", "blocks.0.", "blocks.1."))
        assert (p.grad is None) == lower, name
        assert p.requires_grad != lower, name


def test_freeze_embeddings_includes_bert_embedding_norm():
    model = bert_classifier()
    assert freeze(model, embeddings=True) == numel(model, "tok_emb.", "pos_emb.", "type_emb.", "emb_norm.")
    assert freeze(model, first_n_layers=3) == numel(model, "blocks.")


def test_freeze_refuses_more_layers_than_the_model_has():
    with pytest.raises(ValueError, match="first_n_layers=4 exceeds the model's 3 layers"):
        freeze(gpt_classifier(), first_n_layers=4)
    with pytest.raises(ValueError, match="first_n_layers=-1"):
        freeze(gpt_classifier(), first_n_layers=-1)


def group_of(groups: list[dict], p: torch.nn.Parameter) -> dict:
    (group,) = [g for g in groups if any(q is p for q in g["params"])]
    return group


@pytest.mark.parametrize("build", [gpt_classifier, bert_classifier])
def test_layerwise_learning_rates_follow_the_decay_formula(build):
    model = build()
    base_lr, decay, L = 1e-3, 0.8, 3
    groups = layerwise_lr_groups(model, base_lr, decay, weight_decay=0.01)
    params = list(model.parameters())
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)  # each once
    for name, p in model.named_parameters():
        group = group_of(groups, p)
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            expected = base_lr * decay ** (L - i)
        elif name.startswith(("tok_emb.", "pos_emb.", "type_emb.", "emb_norm.")):
            expected = base_lr * decay ** (L + 1)
        else:  # final norm, pooler, classifier
            expected = base_lr
        assert group["lr"] == pytest.approx(expected), name
        linear_weight = name.endswith("weight") and p.ndim == 2 and "emb" not in name
        assert group["weight_decay"] == (0.01 if linear_weight else 0.0), name


def test_layerwise_groups_hold_only_trainable_parameters_and_work_with_adamw():
    model = gpt_classifier()
    apply_lora(model, LoRAConfig(r=2))
    groups = layerwise_lr_groups(model, 1e-3, 0.5, weight_decay=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    roles = [g["role"] for g in groups]
    assert roles == ["layer_0/decay", "layer_1/decay", "layer_2/decay", "head/decay"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3])
    optimizer = torch.optim.AdamW(groups)
    model(torch.randint(1, 97, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"base_lr": 0.0}, "base_lr=0.0"), ({"decay": 1.5}, "decay=1.5"), ({"weight_decay": -1.0}, "weight_decay=-1.0")],
)
def test_layerwise_groups_refuse_bad_settings(kwargs, message):
    values = {"base_lr": 1e-3, "decay": 0.9, "weight_decay": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        layerwise_lr_groups(gpt_classifier(), **values)
