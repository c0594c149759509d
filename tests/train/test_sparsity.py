"""`SparsityMasks` keeps a pruned layer's zeros under any optimizer: gradients masked, weights re-masked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.train.sparsity import SparsityMasks, sparsity_record


def pruned_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    return model


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> None:
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
    ],
)
def test_zeros_stay_zero_and_the_rest_trains(make):
    model = pruned_mlp()
    before = {i: model[i].weight.detach().clone() for i in (0, 2)}
    optimizer = make(model.parameters())
    masks = SparsityMasks(model, ["0", "2"]).attach(optimizer)
    train(model, optimizer)
    for i, weight in before.items():
        after = model[i].weight.detach()
        assert torch.equal(after == 0, weight == 0)
        assert not torch.allclose(after[weight != 0], weight[weight != 0])
    zeros = sum(int((w == 0).sum()) for w in before.values()) / sum(w.numel() for w in before.values())
    assert masks.overall() == pytest.approx(zeros) and 0.45 < zeros <= 0.5


def test_gradients_of_pruned_weights_are_zero_so_clipping_sees_only_live_ones():
    model = pruned_mlp()
    masks = SparsityMasks(model, ["0"]).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()
    assert torch.all(model[0].weight.grad[masks.masks["0"].logical_not()] == 0)
    assert model[0].weight.grad[masks.masks["0"]].abs().sum() > 0


def test_detached_masks_let_the_zeros_refill():
    model = pruned_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = SparsityMasks(model, ["0"]).attach(optimizer)
    masks.detach()
    train(model, optimizer, steps=1)
    assert (model[0].weight == 0).float().mean() < 0.05


def test_a_layer_the_model_lacks_and_bad_json_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"names layer 'blocks.9.ffn', which this model does not have"):
        SparsityMasks(pruned_mlp(), ["blocks.9.ffn"])
    (tmp_path / "sparsity.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sparsity_record(tmp_path)
    (tmp_path / "sparsity.json").write_text('{"structured": "ffn", "kept": {}}', encoding="utf-8")
    assert sparsity_record(tmp_path) is None  # a structurally pruned (smaller, dense) model needs no masks
