"""Our attention returns its weights on request, equal to transformers' output_attentions (eager attention)."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.hf import ADAPTERS
from lmforge.models import FAMILIES
from lmforge.nn.attention import recorded_attention

HF = {  # family -> (HF model class, its config with 2 layers, 4 heads, GQA for llama)
    "bert": (
        transformers.BertForSequenceClassification,
        transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=40, num_labels=3),
    ),
    "gpt": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4),
    ),
    "llama": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", ["bert", "gpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_recorded_weights_equal_transformers_output_attentions(family):
    model_class, hf_config = HF[family]
    hf_config._attn_implementation = "eager"  # SDPA in transformers does not return weights either
    torch.manual_seed(0)
    hf = model_class(hf_config).eval()
    adapter = ADAPTERS[family]
    head = "sequence_classification" if family == "bert" else "causal_lm"
    config = adapter.config_from_hf(hf.config.to_dict(), head=head)
    ours = FAMILIES[family][1](config).eval()
    ours.load_state_dict(adapter.state_dict_from_hf(hf.state_dict(), config), strict=True)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: pad keys get no weight
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_attentions=True).attentions
        plain = ours(ids, attention_mask=mask).logits
        with recorded_attention(ours) as layers:
            explicit = ours(ids, attention_mask=mask).logits
            weights = [layer.weights for layer in layers]
    assert len(weights) == len(expected) == 2
    real = mask.bool()[:, None, :, None]  # compare the rows of real queries
    for ours_w, hf_w in zip(weights, expected, strict=True):
        assert ours_w.shape == hf_w.shape
        assert ((ours_w - hf_w).abs() * real).max() < 1e-5
        assert torch.allclose(ours_w.sum(-1), torch.ones(()))
    assert (explicit - plain).abs().max() < 1e-5  # the explicit path computes the same model
    assert all(layer.weights is None and not layer.keep_weights for layer in layers)  # SDPA again afterwards
