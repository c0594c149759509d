"""DP-SGD through Opacus: per-example gradients of our layers equal separate backward passes; ε is accounted,
logged and capped; bad settings are one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge import build_model
from lmforge.train.privacy import PrivacySettings, PrivateTraining, check_per_example, register_grad_samplers


def per_example_loss(model, ids, labels):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return out.loss


@pytest.mark.parametrize(
    ("preset", "head"),
    [("gpt-tiny", "causal_lm"), ("llama-tiny", "sequence_classification"), ("bert-tiny", "token_classification")],
)
def test_opacus_per_example_gradients_equal_separate_backward_passes(preset, head):
    """Every layer type we train (TokenEmbedding, positions, LayerNorm, RMSNorm incl. tied weights) through
    Opacus's hooks, against the gradient of each example's loss alone."""
    from opacus import GradSampleModule

    register_grad_samplers()
    torch.manual_seed(0)
    extra = {"attention_dropout": 0.0} if preset == "bert-tiny" else {}
    model = build_model(preset, head=head, n_layer=1, vocab_size=50, max_seq_len=16, num_labels=3, dropout=0.0, **extra)
    model = model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B, T = 3, 6
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    labels = ids if head == "causal_lm" else torch.randint(0, 3, (B,) if head == "sequence_classification" else (B, T))
    expected = []
    for b in range(B):
        model.zero_grad()
        per_example_loss(model, ids[b : b + 1], labels[b : b + 1]).backward()
        expected.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    wrapped = GradSampleModule(model, loss_reduction="sum")
    # the batch loss is the sum of the examples' own losses, so each example's gradient is its own
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    losses = torch.stack([per_example_out_loss(model, out[b : b + 1], labels[b : b + 1]) for b in range(B)])
    losses.sum().backward()
    checked = 0
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"{name} has no per-example gradient"
        for b in range(B):
            assert (p.grad_sample[b] - expected[b][name]).abs().max() < 1e-5, f"{name}, example {b}"
        checked += 1
    assert checked == len(list(model.parameters()))
    wrapped._close()


def per_example_out_loss(model, logits, labels):
    from lmforge.models.heads import head_loss

    return head_loss(model.config.head, logits, labels)
