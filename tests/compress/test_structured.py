"""Structured pruning writes a genuinely smaller model whose outputs equal the original's with the removed
heads or channels zeroed, and that loads back through the normal loader."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge import build_model
from lmforge.compress.prune import calibration_batches
from lmforge.compress.structured import UNIT_KINDS, remove_units
from lmforge.hf.load import load_model
from lmforge.hf.save import save_model


def tiny(preset: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset, n_layer=2, vocab_size=256, **overrides).eval()


def batches() -> list[torch.Tensor]:
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1))
    return calibration_batches(tokens, 4, 24, batch_size=2)


def masked(model: nn.Module, kind: str, kept: dict[str, list[int]]) -> nn.Module:
    """The original with the removed units' outputs zeroed: their columns of the output projection."""
    model = copy.deepcopy(model)
    unit = UNIT_KINDS[kind]
    for name, keep in kept.items():
        block = model.get_submodule(name)
        layer, width = unit.output_layer(block), unit.width(block)
        removed = [u for u in range(layer.in_features // width) if u not in keep]
        with torch.no_grad():
            for u in removed:
                layer.weight[:, u * width : (u + 1) * width] = 0
    return model


@pytest.mark.parametrize(
    ("preset", "kind", "overrides", "expect"),
    [
        ("llama-tiny", "ffn", {}, {"d_ff": 264}),  # 352 * 0.75
        ("bert-tiny", "ffn", {}, {"d_ff": 384}),
        ("llama-tiny", "heads", {}, {"n_head": 2, "n_kv_heads": 2, "head_dim": 32}),  # GQA: 1 of each pair goes
        ("llama-tiny", "heads", {"n_kv_heads": None}, {"n_head": 3, "n_kv_heads": None, "head_dim": 32}),
    ],
)
def test_smaller_model_equals_the_masked_original(tmp_path, preset, kind, overrides, expect):
    original = tiny(preset, **overrides)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    pruned = copy.deepcopy(original)
    amount = 0.5 if kind == "heads" and overrides == {} else 0.25
    removal = remove_units(pruned, kind, amount, batches())
    for key, value in expect.items():
        assert getattr(pruned.config, key) == value
    saved = load_model(save_model(pruned, tmp_path / "small"))  # a fresh model built from the new config
    assert sum(p.numel() for p in saved.parameters()) < sum(p.numel() for p in original.parameters())
    with torch.no_grad():
        reference = masked(original, kind, removal.kept)(ids)
        out = saved(ids)
    field = "logits" if reference.logits is not None else "last_hidden_state"
    torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=1e-4, atol=1e-5)


def test_the_least_contributing_channels_go():
    model = tiny("llama-tiny")
    with torch.no_grad():  # channel 7 of block 0 writes nothing: it must be among those removed
        model.blocks[0].ffn.down.weight[:, 7] = 0
    removal = remove_units(model, "ffn", 0.25, batches())
    assert 7 not in removal.kept["blocks.0"]


@pytest.mark.parametrize(
    ("kind", "amount", "message"),
    [
        ("heads", 0.9, "would remove every head of a layer"),
        ("heads", 1.5, "must be a fraction in (0, 1)"),
        ("ffn", 0.0, "must be a fraction in (0, 1)"),
        ("layers", 0.5, "--structured 'layers' is unknown"),
    ],
)
def test_bad_structured_amounts_are_refused(kind, amount, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        remove_units(tiny("llama-tiny"), kind, amount, batches())


def test_heads_of_a_model_without_head_dim_are_refused():
    with pytest.raises(ValueError, match="use --structured ffn"):
        remove_units(tiny("gpt-tiny"), "heads", 0.25, batches())
