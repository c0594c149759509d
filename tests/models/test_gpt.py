"""GPT-2 against Hugging Face `transformers` (random small models), and the HF mapping both ways."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.hf import ADAPTERS
from lmforge.models.gpt import GPT, GPTConfig

ADAPTER = ADAPTERS["gpt"]

HF_CLASSES = {
    "none": transformers.GPT2Model,
    "causal_lm": transformers.GPT2LMHeadModel,
    "sequence_classification": transformers.GPT2ForSequenceClassification,
    "token_classification": transformers.GPT2ForTokenClassification,
    "question_answering": transformers.GPT2ForQuestionAnswering,
}
PAD = 0


def small_hf_config(**changes) -> transformers.GPT2Config:
    values = dict(
        vocab_size=97,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=4,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2Config(**{**values, **changes})


def right_padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 11, 7 and 3 real tokens (never the pad id), right-padded with PAD."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (3, 11), generator=g)
    mask = (torch.arange(11)[None, :] < torch.tensor([[11], [7], [3]])).long()
    return ids.masked_fill(mask == 0, PAD), mask


def hf_and_ours(head: str, **changes) -> tuple[torch.nn.Module, GPT]:
    torch.manual_seed(0)
    hf = HF_CLASSES[head](small_hf_config(**changes)).eval()
    config = ADAPTER.config_from_hf(hf.config.to_dict(), head=head)
    ours = GPT(config).eval()
    ours.load_state_dict(ADAPTER.state_dict_from_hf(hf.state_dict(), config), strict=True)
    return hf, ours


def real_token_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": False},
        {"n_inner": 40, "activation_function": "gelu"},
        {"activation_function": "relu", "layer_norm_epsilon": 1e-6},
    ],
)
def test_causal_lm_matches_transformers(changes):
    hf, ours = hf_and_ours("causal_lm", **changes)
    ids, mask = right_padded_batch(97)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert real_token_diff(got.logits, expected.logits, mask) <= 1e-4
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5


def test_reference_attention_matches_transformers():
    hf, ours = hf_and_ours("causal_lm")
    ours_ref = GPT(ours.config.replace(attention="reference")).eval()
    ours_ref.load_state_dict(ours.state_dict())
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        diff = real_token_diff(ours_ref(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-4


def test_sequence_classification_matches_transformers():
    hf, ours = hf_and_ours("sequence_classification", num_labels=3)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        expected, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("head", ["none", "token_classification", "question_answering"])
def test_token_level_heads_match_transformers(head):
    hf, ours = hf_and_ours(head, num_labels=5)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    if head == "none":
        assert got.logits is None
        expected, got = out.last_hidden_state, got.last_hidden_state
    elif head == "question_answering":
        expected, got = torch.stack([out.start_logits, out.end_logits], dim=-1), got.logits
    else:
        expected, got = out.logits, got.logits
    assert real_token_diff(got, expected, mask) <= 1e-4


@pytest.mark.parametrize(
    "config, expected",
    [(GPTConfig(), 124_439_808), (GPTConfig(n_layer=24, n_head=16, d_model=1024), 354_823_168)],
)
def test_parameter_counts_match_transformers(config, expected):
    with torch.device("meta"):
        ours = GPT(config)
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**ADAPTER.config_to_hf(config)))
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert sum(p.numel() for p in hf.parameters()) == expected


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=48),
        GPTConfig(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=48, tie_embeddings=False, d_ff=40),
        GPTConfig(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=48, head="token_classification"),
    ],
)
def test_round_trip_to_transformers(config):
    torch.manual_seed(0)
    ours = GPT(config).eval()
    hf_config = ADAPTER.config_to_hf(config)
    assert ADAPTER.config_from_hf(hf_config) == config
    hf_cfg = transformers.AutoConfig.for_model(**hf_config)
    hf = getattr(transformers, hf_config["architectures"][0])(hf_cfg).eval()
    hf.load_state_dict(ADAPTER.state_dict_to_hf(ours.state_dict(), config), strict=True)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        assert real_token_diff(ours(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4


def test_original_checkpoint_layout_loads():
    """OpenAI-converted checkpoints: no `transformer.` prefix, causal-mask buffers, no lm_head (tied)."""
    hf, ours = hf_and_ours("causal_lm")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    loaded = GPT(ours.config).eval()
    loaded.load_state_dict(ADAPTER.state_dict_from_hf(state, ours.config), strict=True)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).logits, ours(ids, mask).logits)


def test_mismatched_state_dict_names_the_tensors():
    hf, ours = hf_and_ours("causal_lm")
    state = hf.state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias.*h\.9\.extra\.weight"):
        ADAPTER.state_dict_from_hf(state, ours.config)
    ours_state = ours.state_dict()
    del ours_state["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        ADAPTER.state_dict_to_hf(ours_state, ours.config)


def test_config_from_hf_reads_head_and_rejects_unsupported():
    hf_config = {**ADAPTER.config_to_hf(GPTConfig()), "architectures": ["GPT2ForSequenceClassification"]}
    hf_config["id2label"] = {"0": "neg", "1": "neutral", "2": "pos"}
    config = ADAPTER.config_from_hf(hf_config)
    assert (config.head, config.num_labels) == ("sequence_classification", 3)
    assert ADAPTER.config_from_hf(hf_config, head="causal_lm").head == "causal_lm"
    with pytest.raises(ValueError, match="activation_function"):
        ADAPTER.config_from_hf({**hf_config, "activation_function": "quick_gelu"})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        ADAPTER.config_from_hf({**hf_config, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="bias=False"):
        ADAPTER.config_to_hf(GPTConfig(bias=False))
