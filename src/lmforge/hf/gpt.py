"""GPT-2 <-> Hugging Face `gpt2` checkpoints (model_type "gpt2").

HF's GPT-2 keeps OpenAI's `Conv1D` layers: y = x W + b with W stored as (in, out), the transpose of
nn.Linear's (out, in), so every projection matrix is transposed on the way in and out. Its fused `c_attn`
is already in q, k, v order, like our `qkv`. The original checkpoints carry no `transformer.` prefix and
keep each layer's causal-mask buffer (`h.<i>.attn.bias`, `h.<i>.attn.masked_bias`), which is not a weight
and is skipped. A tied checkpoint may or may not store `lm_head.weight`; it is the token embedding.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmforge.hf.common import Copy, Entry, Rename, Tie, layers, params, rename_from_hf, rename_to_hf
from lmforge.models.gpt import GPTConfig

ARCHITECTURES = {
    "GPT2Model": "none",
    "GPT2LMHeadModel": "causal_lm",
    "GPT2ForSequenceClassification": "sequence_classification",
    "GPT2ForTokenClassification": "token_classification",
    "GPT2ForQuestionAnswering": "question_answering",
}
HEAD_WEIGHTS = {  # our classifier -> HF head module
    "sequence_classification": "score",
    "token_classification": "classifier",
    "question_answering": "qa_outputs",
}
ACTIVATIONS_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(masked_)?bias$")
BLOCK = [  # layer i; the Conv1D weights are transposed
    *params("blocks.{i}.attn_norm", "h.{i}.ln_1"),
    *params("blocks.{i}.attn.qkv", "h.{i}.attn.c_attn", transpose=True),
    *params("blocks.{i}.attn.out", "h.{i}.attn.c_proj", transpose=True),
    *params("blocks.{i}.ffn_norm", "h.{i}.ln_2"),
    *params("blocks.{i}.ffn.fc", "h.{i}.mlp.c_fc", transpose=True),
    *params("blocks.{i}.ffn.proj", "h.{i}.mlp.c_proj", transpose=True),
]


def head_from_architectures(hf_config: dict[str, Any], head: str | None) -> str:
    """`head` if given, else the head of the first listed architecture, else causal_lm."""
    if head is not None:
        return head
    architectures = hf_config.get("architectures") or ["GPT2LMHeadModel"]
    if architectures[0] not in ARCHITECTURES:
        raise ValueError(f"architecture {architectures[0]!r} is not supported; choose one of {list(ARCHITECTURES)}")
    return ARCHITECTURES[architectures[0]]


def num_labels_from_hf(hf_config: dict[str, Any]) -> int:
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return hf_config.get("num_labels", 2)


def table(config: GPTConfig) -> list[Entry]:
    """Our tensors and HF's (the backbone's without its `transformer.` prefix)."""
    entries: list[Entry] = [
        Rename("tok_emb.weight", "wte.weight"),
        Rename("pos_emb.weight", "wpe.weight"),
        *layers(config.n_layer, BLOCK),
        *params("norm", "ln_f"),
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


class GPTAdapter:
    """`StateDictAdapter` for GPT: HF's GPT2Model, GPT2LMHeadModel, GPT2For{Sequence,Token}Classification and
    GPT2ForQuestionAnswering."""

    model_types = ("gpt2",)

    def config_from_hf(self, hf_config: dict[str, Any], head: str | None = None) -> GPTConfig:
        """A GPTConfig from a Hugging Face GPT-2 `config.json` dict."""
        model_type = hf_config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"model_type={model_type!r} is not GPT-2; the gpt mapping reads model_type 'gpt2'")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf_config.get(flag):
                raise ValueError(f"{flag}=True is not supported by lmforge's GPT; only the standard GPT-2 layer is")
        if hf_config.get("scale_attn_weights") is False:
            raise ValueError("scale_attn_weights=False is not supported; GPT uses the 1/sqrt(d_head) scale")
        activation = hf_config.get("activation_function", "gelu_new")
        if activation not in ACTIVATIONS_FROM_HF:
            raise ValueError(
                f"activation_function={activation!r} is not supported; choose one of {list(ACTIVATIONS_FROM_HF)}"
            )
        return GPTConfig(
            head=head_from_architectures(hf_config, head),
            num_labels=num_labels_from_hf(hf_config),
            vocab_size=hf_config.get("vocab_size", 50257),
            max_seq_len=hf_config.get("n_positions", hf_config.get("n_ctx", 1024)),
            n_layer=hf_config.get("n_layer", 12),
            n_head=hf_config.get("n_head", 12),
            d_model=hf_config.get("n_embd", 768),
            d_ff=hf_config.get("n_inner"),
            dropout=hf_config.get("resid_pdrop", 0.1),
            bias=True,
            norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
            activation=ACTIVATIONS_FROM_HF[activation],
            tie_embeddings=hf_config.get("tie_word_embeddings", True),
            pad_token_id=hf_config.get("pad_token_id"),
        )

    def config_to_hf(self, config: GPTConfig) -> dict[str, Any]:
        """A Hugging Face GPT-2 `config.json` dict for this config (GPT-2 has biases everywhere)."""
        if not config.bias:
            raise ValueError("bias=False has no Hugging Face GPT-2 equivalent (its layers always have biases)")
        architecture = {v: k for k, v in ARCHITECTURES.items()}[config.head]
        hf = {
            "model_type": "gpt2",
            "architectures": [architecture],
            "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.d_model,
            "n_inner": config.d_ff,
            "activation_function": ACTIVATIONS_TO_HF[config.activation],
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": config.tie_embeddings,
            "pad_token_id": config.pad_token_id,
        }
        if config.head in ("sequence_classification", "token_classification"):
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
        return hf

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
        """Our state dict from a HF GPT-2 one (with or without the `transformer.` prefix)."""
        hf = {}
        for name, tensor in hf_state.items():
            name = name.removeprefix("transformer.")
            if not MASK_BUFFER.match(name):
                hf[name] = tensor
        return rename_from_hf(hf, table(config))

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
        """The HF GPT-2 state dict (as `GPT2LMHeadModel(...).state_dict()` names it) of our state dict."""
        prefix = "" if config.head == "none" else "transformer."
        hf = rename_to_hf(state, table(config))
        return {name if is_head_key(name) else prefix + name: tensor for name, tensor in hf.items()}
