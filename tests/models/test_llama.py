"""Llama (and its Mistral / Qwen2 / Qwen3 relatives) against Hugging Face `transformers`, the HF mapping
both ways, and the KV cache."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.hf import ADAPTERS
from lmforge.models.llama import Llama, LlamaConfig
from lmforge.nn import KVCache

ADAPTER = ADAPTERS["llama"]

HEAD_SUFFIXES = {
    "none": "Model",
    "causal_lm": "ForCausalLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
CONFIG_CLASSES = {
    "Llama": transformers.LlamaConfig,
    "Mistral": transformers.MistralConfig,
    "Qwen2": transformers.Qwen2Config,
    "Qwen3": transformers.Qwen3Config,
}
PAD = 0
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # with head_dim 16, wavelengths fall in all three bands
}
OUR_LLAMA3_SCALING = {
    "type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_seq_len": 64,
}


def small_hf_config(kind: str = "Llama", **changes):
    values = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CONFIG_CLASSES[kind](**{**values, **changes})


def right_padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 11, 7 and 3 real tokens (never the pad id), right-padded with PAD."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (3, 11), generator=g)
    mask = (torch.arange(11)[None, :] < torch.tensor([[11], [7], [3]])).long()
    return ids.masked_fill(mask == 0, PAD), mask


def hf_and_ours(head: str, kind: str = "Llama", **changes) -> tuple[torch.nn.Module, Llama]:
    torch.manual_seed(0)
    hf_cls = getattr(transformers, kind + HEAD_SUFFIXES[head])
    hf = hf_cls(small_hf_config(kind, **changes)).eval()
    with torch.no_grad():  # HF zero-initialises biases; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    config = ADAPTER.config_from_hf(hf.config.to_dict(), head=head)
    ours = Llama(config).eval()
    ours.load_state_dict(ADAPTER.state_dict_from_hf(hf.state_dict(), config), strict=True)
    return hf, ours


def real_token_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize(
    "kind, changes",
    [
        ("Llama", {}),  # multi-head attention, untied
        ("Llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),  # GQA, tied
        ("Llama", {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),  # MQA, all biases
        ("Llama", {"head_dim": 32, "num_key_value_heads": 2}),  # head_dim * n_head != d_model
        ("Llama", {"head_dim": 16, "rope_parameters": LLAMA3_ROPE}),  # Llama 3.1 rope scaling
        ("Llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
        ("Mistral", {"num_key_value_heads": 2, "sliding_window": None}),
        ("Qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),  # bias on q/k/v only
        ("Qwen3", {"num_key_value_heads": 2, "head_dim": 16}),  # QK-norm
        ("Qwen3", {"head_dim": 16, "attention_bias": True}),
    ],
)
def test_causal_lm_matches_transformers(kind, changes):
    hf, ours = hf_and_ours("causal_lm", kind, **changes)
    ids, mask = right_padded_batch(97)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert real_token_diff(got.logits, expected.logits, mask) <= 1e-4
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5


def test_qwen2_biases_sit_on_qkv_only():
    _, ours = hf_and_ours("causal_lm", "Qwen2")
    attn = ours.blocks[0].attn
    assert attn.qkv.bias is not None and attn.out.bias is None


def test_reference_attention_matches_transformers():
    hf, ours = hf_and_ours("causal_lm", num_key_value_heads=2)
    ours_ref = Llama(ours.config.replace(attention="reference")).eval()
    ours_ref.load_state_dict(ours.state_dict())
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        diff = real_token_diff(ours_ref(ids, mask).logits, hf(input_ids=ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-4


def test_sequence_classification_matches_transformers():
    hf, ours = hf_and_ours("sequence_classification", num_key_value_heads=2, num_labels=3)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        expected, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
    assert got.shape == (3, 3)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "kind, head",
    [
        ("Llama", "none"),
        ("Llama", "token_classification"),
        ("Llama", "question_answering"),
        ("Qwen2", "question_answering"),
    ],
)
def test_token_level_heads_match_transformers(kind, head):
    hf, ours = hf_and_ours(head, kind, num_key_value_heads=2, num_labels=5)
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


SMOLLM2_135M = {  # config.json of HuggingFaceTB/SmolLM2-135M, abridged
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 100000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pad_token_id": None,
}


@pytest.mark.parametrize(
    "config, expected",
    [
        (ADAPTER.config_from_hf(SMOLLM2_135M), 134_515_008),
        (LlamaConfig(n_layer=32, n_head=32, d_model=4096, max_seq_len=4096), 6_738_415_616),  # Llama 2 7B
        (
            LlamaConfig(vocab_size=128256, n_layer=32, n_head=32, n_kv_heads=8, d_model=4096, d_ff=14336),
            8_030_261_248,  # Llama 3 8B
        ),
    ],
)
def test_parameter_counts_match_transformers(config, expected):
    with torch.device("meta"):
        ours = Llama(config)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ADAPTER.config_to_hf(config)))
    assert sum(p.numel() for p in ours.parameters()) == expected
    assert sum(p.numel() for p in hf.parameters()) == expected


def test_smollm2_config_reads_as_published():
    config = ADAPTER.config_from_hf(SMOLLM2_135M)
    assert (config.vocab_size, config.d_model, config.ffn_dim, config.n_layer) == (49152, 576, 1536, 30)
    assert (config.n_head, config.n_kv_heads, config.head_dim, config.tie_embeddings) == (9, 3, None, True)
    assert (config.rope_theta, config.norm_eps, config.head) == (100000, 1e-5, "causal_lm")


def test_default_ffn_width_follows_llama_rule():
    assert LlamaConfig(d_model=4096, n_head=32).ffn_dim == 11008
    assert LlamaConfig(d_model=768).ffn_dim == 2048
    assert LlamaConfig(d_model=768, d_ff=100).ffn_dim == 100


TINY = dict(vocab_size=97, max_seq_len=64, n_layer=2, n_head=4, d_model=64, d_ff=96, pad_token_id=PAD)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        LlamaConfig(**TINY, n_kv_heads=2, tie_embeddings=True, head="sequence_classification", num_labels=3),
        LlamaConfig(**TINY, n_kv_heads=1, attention_bias=True, attention_out_bias=True, mlp_bias=True),
        LlamaConfig(**TINY, head_dim=32, rope_theta=500000.0, rope_scaling=OUR_LLAMA3_SCALING),
        LlamaConfig(**TINY, n_kv_heads=2, attention_bias=True, head="question_answering"),  # -> qwen2
        LlamaConfig(**TINY, n_kv_heads=2, head_dim=32, qk_norm=True, head="token_classification"),  # -> qwen3
    ],
)
def test_round_trip_to_transformers(config):
    torch.manual_seed(0)
    ours = Llama(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    hf_config = ADAPTER.config_to_hf(config)
    assert ADAPTER.config_from_hf(hf_config) == config
    hf_cfg = transformers.AutoConfig.for_model(**hf_config)
    hf = getattr(transformers, hf_config["architectures"][0])(hf_cfg).eval()
    hf.load_state_dict(ADAPTER.state_dict_to_hf(ours.state_dict(), config), strict=True)
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        got, expected = ours(ids, mask).logits, hf(input_ids=ids, attention_mask=mask)
    if config.head == "question_answering":
        expected = torch.stack([expected.start_logits, expected.end_logits], dim=-1)
    else:
        expected = expected.logits
    if config.head == "sequence_classification":
        assert (got - expected).abs().max().item() <= 1e-4
    else:
        assert real_token_diff(got, expected, mask) <= 1e-4


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_kv_cache_matches_full_forward(attention):
    """Left-padded batch, GQA: prefill 4 tokens, then decode one at a time; logits equal the full pass."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY, n_kv_heads=2, attention=attention)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (3, 10), generator=g)
    mask = (torch.arange(10)[None, :] >= torch.tensor([[0], [3], [5]])).long()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(4, 10):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            steps.append(out.logits)
    assert isinstance(cache, KVCache) and len(cache) == 10
    assert real_token_diff(torch.cat(steps, dim=1), full, mask) <= 1e-5


def test_kv_cache_without_mask_matches_full_forward():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY, n_kv_heads=1)).eval()
    ids = torch.randint(1, 97, (2, 8))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 8):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_rejects_bad_configs_and_long_inputs():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(**TINY, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(**TINY, head_dim=15)
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(**TINY, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling is missing"):
        LlamaConfig(**TINY, rope_scaling={"type": "llama3", "factor": 4.0})
    with pytest.raises(ValueError, match="head"):
        LlamaConfig(**TINY, head="masked_lm")
    model = Llama(LlamaConfig(**{**TINY, "max_seq_len": 8}))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_config_from_hf_reads_each_rope_layout_and_relative():
    hf_scaling = {key: value for key, value in LLAMA3_ROPE.items() if key != "rope_theta"}
    legacy = {**SMOLLM2_135M, "rope_theta": 500000.0, "rope_scaling": hf_scaling}
    config = ADAPTER.config_from_hf(legacy)
    assert (config.rope_theta, config.rope_scaling) == (500000.0, OUR_LLAMA3_SCALING)
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(LLAMA3_ROPE)
    assert ADAPTER.config_from_hf(v5) == config
    mistral = {**SMOLLM2_135M, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert ADAPTER.config_from_hf({**mistral, "sliding_window": 4096}).max_seq_len == 4096
    assert ADAPTER.config_from_hf({**mistral, "sliding_window": None}).max_seq_len == 8192
    qwen2 = ADAPTER.config_from_hf(
        {**SMOLLM2_135M, "model_type": "qwen2", "architectures": ["Qwen2ForTokenClassification"]}
    )
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.head) == (
        True,
        False,
        "token_classification",
    )
    with pytest.raises(ValueError, match="rope_type"):
        ADAPTER.config_from_hf({**SMOLLM2_135M, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        ADAPTER.config_from_hf({**SMOLLM2_135M, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="attention_out_bias"):
        ADAPTER.config_to_hf(LlamaConfig(**TINY, attention_out_bias=True))


def test_mismatched_state_dict_names_the_tensors():
    hf, ours = hf_and_ours("causal_lm", num_key_value_heads=2)
    state = hf.state_dict()
    del state["model.layers.1.self_attn.k_proj.weight"]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old conversions: ignored
    state["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(96)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.weight.*layers\.0\.mlp\.gate_proj\.bias"):
        ADAPTER.state_dict_from_hf(state, ours.config)
    ours_state = ours.state_dict()
    del ours_state["blocks.1.ffn.up.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.up\.weight"):
        ADAPTER.state_dict_to_hf(ours_state, ours.config)


def test_tied_checkpoint_without_lm_head_loads():
    hf, ours = hf_and_ours("causal_lm", tie_word_embeddings=True)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    loaded = Llama(ours.config).eval()
    loaded.load_state_dict(ADAPTER.state_dict_from_hf(state, ours.config), strict=True)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    ids, mask = right_padded_batch(97)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).logits, ours(ids, mask).logits)
