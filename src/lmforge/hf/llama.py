"""Llama <-> Hugging Face `llama`, `mistral`, `qwen2` and `qwen3` checkpoints.

The four share one layer; they differ in which projections carry a bias and in the QK-norm:
  llama   `attention_bias` on q/k/v and o together, `mlp_bias` on the MLP
  mistral no biases; `sliding_window` attention, equal to full causal attention for sequences no longer
          than the window, so max_seq_len is capped at the window
  qwen2   bias on q/k/v, none on o
  qwen3   RMSNorm on each query/key head (`q_norm`, `k_norm`), `attention_bias` on q/k/v and o together
HF keeps q_proj, k_proj and v_proj apart; we concatenate them, in that order, into the fused `qkv`
(rows [0, H d) are q, then H_kv d rows of k, then of v). RoPE follows HF's "rotate half" feature layout
in both, so no permutation is needed. HF's RoPE settings come either as `rope_theta` + `rope_scaling`
(config.json of most checkpoints) or as `rope_parameters` (transformers >= 5); both are read.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.hf.common import Copy, Entry, Rename, Tie, layers, params, rename_from_hf, rename_to_hf
from lmforge.models.llama import LlamaConfig

MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
HEAD_SUFFIXES = {
    "Model": "none",
    "ForCausalLM": "causal_lm",
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
}
HEAD_WEIGHTS = {
    "sequence_classification": "score",
    "token_classification": "score",
    "question_answering": "qa_outputs",
}


def head_from_architectures(hf_config: dict[str, Any], model_type: str, head: str | None) -> str:
    """`head` if given, else the head of the first listed architecture, else causal_lm."""
    if head is not None:
        return head
    architectures = hf_config.get("architectures")
    if not architectures:
        return "causal_lm"
    prefix = MODEL_TYPES[model_type]
    suffix = architectures[0].removeprefix(prefix)
    if not architectures[0].startswith(prefix) or suffix not in HEAD_SUFFIXES:
        supported = [prefix + s for s in HEAD_SUFFIXES]
        raise ValueError(f"architecture {architectures[0]!r} is not supported; choose one of {supported}")
    return HEAD_SUFFIXES[suffix]


def rope_from_hf(hf_config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from either HF layout."""
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope_type={kind!r} is not supported; lmforge's Llama reads 'default' and 'llama3'")
    scaling = {
        "type": "llama3",
        "factor": rope["factor"],
        "low_freq_factor": rope["low_freq_factor"],
        "high_freq_factor": rope["high_freq_factor"],
        "original_max_seq_len": rope.get("original_max_position_embeddings", hf_config["max_position_embeddings"]),
    }
    return theta, scaling


def model_type_of(config: LlamaConfig) -> str:
    """The HF model_type whose layer equals ours: llama, or qwen2 / qwen3 for their bias and norm patterns."""
    if config.qk_norm and config.attention_bias == config.attention_out_bias and not config.mlp_bias:
        return "qwen3"
    if not config.qk_norm and config.attention_bias and not config.attention_out_bias and not config.mlp_bias:
        return "qwen2"
    if not config.qk_norm and config.attention_bias == config.attention_out_bias:
        return "llama"
    raise ValueError(
        f"no Hugging Face model has attention_bias={config.attention_bias}, "
        f"attention_out_bias={config.attention_out_bias}, mlp_bias={config.mlp_bias}, "
        f"qk_norm={config.qk_norm}; HF llama ties the two attention biases, qwen2 has q/k/v bias only, "
        f"qwen3 has qk_norm and no MLP bias"
    )


def table(config: LlamaConfig) -> list[Entry]:
    """Our tensors and HF's (the backbone's without its `model.` / `transformer.` prefix)."""
    q_rows = config.n_head * config.head_width
    kv_rows = (config.n_kv_heads or config.n_head) * config.head_width
    attn = "layers.{i}.self_attn."  # `{i}` stays a template field inside the f-strings below
    block = [
        *params(
            "blocks.{i}.attn.qkv",
            (f"{attn}q_proj", f"{attn}k_proj", f"{attn}v_proj"),
            bias=config.attention_bias,
            sizes=(q_rows, kv_rows, kv_rows),
        ),
        *params("blocks.{i}.attn.out", f"{attn}o_proj", bias=config.attention_out_bias),
    ]
    if config.qk_norm:
        block += [
            *params("blocks.{i}.attn.q_norm", f"{attn}q_norm", bias=False),
            *params("blocks.{i}.attn.k_norm", f"{attn}k_norm", bias=False),
        ]
    block += [
        Rename("blocks.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight"),
        Rename("blocks.{i}.ffn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
        *params("blocks.{i}.ffn.gate", "layers.{i}.mlp.gate_proj", bias=config.mlp_bias),
        *params("blocks.{i}.ffn.up", "layers.{i}.mlp.up_proj", bias=config.mlp_bias),
        *params("blocks.{i}.ffn.down", "layers.{i}.mlp.down_proj", bias=config.mlp_bias),
    ]
    entries: list[Entry] = [
        Rename("tok_emb.weight", "embed_tokens.weight"),
        *layers(config.n_layer, block),
        Rename("norm.weight", "norm.weight"),
    ]
    if config.head == "causal_lm" and config.tie_embeddings:
        entries += [Tie("lm_head.weight", "tok_emb.weight"), Copy("lm_head.weight", "tok_emb.weight")]
    elif config.head == "causal_lm":
        entries.append(Rename("lm_head.weight", "lm_head.weight"))
    if config.head in HEAD_WEIGHTS:
        entries += params("classifier.out", HEAD_WEIGHTS[config.head], bias=config.head != "sequence_classification")
    return entries


def is_head_key(name: str) -> bool:
    return name.split(".")[0] in ("lm_head", *HEAD_WEIGHTS.values())


class LlamaAdapter:
    """`StateDictAdapter` for Llama: HF's <Llama|Mistral|Qwen2|Qwen3>Model, ...ForCausalLM,
    ...For{Sequence,Token}Classification and ...ForQuestionAnswering."""

    model_types = tuple(MODEL_TYPES)

    def config_from_hf(self, hf_config: dict[str, Any], head: str | None = None) -> LlamaConfig:
        """A LlamaConfig from a Hugging Face Llama / Mistral / Qwen2 / Qwen3 `config.json` dict.
        n_kv_heads and head_dim are left None when they equal their defaults (n_head, d_model // n_head)."""
        model_type = hf_config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported by the llama mapping; choose one of {list(MODEL_TYPES)}"
            )
        if hf_config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf_config['hidden_act']!r} is not supported; Llama's SwiGLU uses 'silu'")
        d_model, n_head = hf_config.get("hidden_size", 4096), hf_config.get("num_attention_heads", 32)
        n_kv_heads = hf_config.get("num_key_value_heads") or n_head
        head_dim = hf_config.get("head_dim") or (128 if model_type == "qwen3" else None)
        max_seq_len = hf_config.get("max_position_embeddings", 2048)
        if model_type == "mistral":
            window = hf_config.get("sliding_window", 4096)
        else:
            window = hf_config.get("sliding_window", 4096) if hf_config.get("use_sliding_window") else None
        if window:
            max_seq_len = min(max_seq_len, window)
        bias = hf_config.get("attention_bias", False)
        theta, scaling = rope_from_hf(hf_config)
        id2label = hf_config.get("id2label")
        return LlamaConfig(
            head=head_from_architectures(hf_config, model_type, head),
            num_labels=len(id2label) if id2label else hf_config.get("num_labels", 2),
            vocab_size=hf_config.get("vocab_size", 32000),
            max_seq_len=max_seq_len,
            n_layer=hf_config.get("num_hidden_layers", 32),
            n_head=n_head,
            n_kv_heads=None if n_kv_heads == n_head else n_kv_heads,
            d_model=d_model,
            d_ff=hf_config.get("intermediate_size", 11008),
            head_dim=None if head_dim == d_model // n_head else head_dim,
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bias or model_type == "qwen2",
            attention_out_bias=bias and model_type != "qwen2",
            mlp_bias=hf_config.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            tie_embeddings=hf_config.get("tie_word_embeddings", False),
            dropout=hf_config.get("attention_dropout", 0.0),
            pad_token_id=hf_config.get("pad_token_id"),
        )

    def config_to_hf(self, config: LlamaConfig) -> dict[str, Any]:
        """A Hugging Face `config.json` dict (model_type llama, qwen2 or qwen3) for this config."""
        model_type = model_type_of(config)
        architecture = MODEL_TYPES[model_type] + {v: k for k, v in HEAD_SUFFIXES.items()}[config.head]
        hf = {
            "model_type": model_type,
            "architectures": [architecture],
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_seq_len,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_heads or config.n_head,
            "hidden_size": config.d_model,
            "intermediate_size": config.ffn_dim,
            "head_dim": config.head_width,
            "hidden_act": "silu",
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "tie_word_embeddings": config.tie_embeddings,
            "attention_dropout": config.dropout,
            "pad_token_id": config.pad_token_id,
        }
        if config.rope_scaling:
            s = config.rope_scaling
            hf["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s["factor"],
                "low_freq_factor": s["low_freq_factor"],
                "high_freq_factor": s["high_freq_factor"],
                "original_max_position_embeddings": s["original_max_seq_len"],
            }
        if model_type == "llama":
            hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
        else:
            hf["use_sliding_window"] = False
            if model_type == "qwen3":
                hf["attention_bias"] = config.attention_bias
        if config.head in ("sequence_classification", "token_classification"):
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
        return hf

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
        """Our state dict from a HF one (backbone under `model.`, `transformer.` or no prefix)."""
        hf = {}
        for name, tensor in hf_state.items():
            if not name.endswith("rotary_emb.inv_freq"):  # a buffer some early conversions saved
                hf[name.removeprefix("model.").removeprefix("transformer.")] = tensor
        return rename_from_hf(hf, table(config))

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
        """The HF state dict (as `<Arch>For...(...).state_dict()` names it) of our state dict."""
        if config.head == "none":
            prefix = ""
        elif config.head == "question_answering":
            prefix = "transformer."  # HF keeps this older name for the QA models' backbone
        else:
            prefix = "model."
        hf = rename_to_hf(state, table(config))
        return {name if is_head_key(name) else prefix + name: tensor for name, tensor in hf.items()}
