"""Hugging Face BERT / RoBERTa checkpoints <-> lmforge `Bert`.

Hugging Face stores query, key and value as three Linears; lmforge fuses them into one `qkv` (rows q, k, v).
Head models prefix the encoder's tensors with "bert." / "roberta."; the bare model (BertModel) does not.
The masked-LM decoder is tied to the word embeddings, so its weight is not read from the checkpoint and is
written back as a copy. Tensors that released checkpoints carry but the model does not use are dropped:
the next-sentence head (cls.seq_relationship), a pooler under a head that has none, and old position-id
buffers. Anything else left over, or missing, is an error.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.models.bert import BertConfig, RobertaConfig

CONFIGS = {"bert": BertConfig, "roberta": RobertaConfig}
PREFIX = {"bert": "Bert", "roberta": "Roberta"}
ARCHITECTURE_HEADS = {
    "Model": "none",
    "ForMaskedLM": "masked_lm",
    "ForPreTraining": "masked_lm",  # its next-sentence head is dropped
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForQuestionAnswering": "question_answering",
}
HEAD_ARCHITECTURE = {
    "none": "Model",
    "masked_lm": "ForMaskedLM",
    "sequence_classification": "ForSequenceClassification",
    "token_classification": "ForTokenClassification",
    "question_answering": "ForQuestionAnswering",
}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
FROM_HF_ACTIVATION = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def config_from_hf(hf_config: dict[str, Any], head: str | None = None) -> BertConfig:
    """A `config.json` dict -> BertConfig / RobertaConfig; `head` overrides the one `architectures` names."""
    model_type = hf_config.get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(f"model_type={model_type!r} is not a BERT-family model; expected one of {list(CONFIGS)}")
    positions = hf_config.get("position_embedding_type", "absolute")
    if positions != "absolute":
        raise ValueError(f"position_embedding_type={positions!r} is not supported; only 'absolute' is")
    act = hf_config.get("hidden_act", "gelu")
    if act not in FROM_HF_ACTIVATION:
        raise ValueError(f"hidden_act={act!r} is not supported; choose one of {list(FROM_HF_ACTIVATION)}")
    if head is None:
        head = "none"
        for arch in hf_config.get("architectures") or []:
            suffix = arch.removeprefix(PREFIX[model_type])
            if suffix not in ARCHITECTURE_HEADS:
                raise ValueError(f"architecture {arch!r} is not supported; known: {sorted(ARCHITECTURE_HEADS)}")
            head = ARCHITECTURE_HEADS[suffix]
    values = {
        "vocab_size": hf_config["vocab_size"],
        "max_seq_len": hf_config["max_position_embeddings"],
        "type_vocab_size": hf_config["type_vocab_size"],
        "n_layer": hf_config["num_hidden_layers"],
        "n_head": hf_config["num_attention_heads"],
        "d_model": hf_config["hidden_size"],
        "d_ff": hf_config["intermediate_size"],
        "activation": FROM_HF_ACTIVATION[act],
        "dropout": hf_config.get("hidden_dropout_prob", 0.1),
        "attention_dropout": hf_config.get("attention_probs_dropout_prob", 0.1),
        "norm_eps": hf_config["layer_norm_eps"],
        "pad_token_id": hf_config.get("pad_token_id", CONFIGS[model_type].pad_token_id),
        "num_labels": len(hf_config["id2label"]) if "id2label" in hf_config else hf_config.get("num_labels", 2),
        "head": head,
    }
    return CONFIGS[model_type](**values)


def config_to_hf(config: BertConfig) -> dict[str, Any]:
    """BertConfig / RobertaConfig -> a `config.json` dict for the matching Hugging Face class."""
    n_labels = 2 if config.head == "question_answering" else config.num_labels  # HF's QA head: start, end
    hf = {
        "model_type": config.family,
        "architectures": [PREFIX[config.family] + HEAD_ARCHITECTURE[config.head]],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "type_vocab_size": config.type_vocab_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "hidden_act": TO_HF_ACTIVATION[config.activation],
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "id2label": {str(i): f"LABEL_{i}" for i in range(n_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(n_labels)},
    }
    if config.family == "roberta":
        hf.update(bos_token_id=0, eos_token_id=2)
    return hf


def _has_pooler(config: BertConfig) -> bool:
    return config.head == "none" or (config.head == "sequence_classification" and config.family == "bert")


def _name_map(config: BertConfig) -> dict[str, str]:
    """lmforge name -> Hugging Face name, for every tensor but the fused qkv and the tied decoder weight."""
    base = "" if config.head == "none" else f"{config.family}."
    names = {
        "tok_emb.weight": "embeddings.word_embeddings.weight",
        "pos_emb.weight": "embeddings.position_embeddings.weight",
        "type_emb.weight": "embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for a, b in [
            ("attn.out", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),
            ("ffn.fc", "intermediate.dense"),
            ("ffn.proj", "output.dense"),
            ("ffn_norm", "output.LayerNorm"),
        ]:
            for p in ("weight", "bias"):
                names[f"{ours}{a}.{p}"] = f"{theirs}{b}.{p}"
    if _has_pooler(config):
        names.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    names = {k: base + v for k, v in names.items()}

    roberta = config.family == "roberta"
    head_modules = {
        "masked_lm": {
            "lm_head.dense": "lm_head.dense" if roberta else "cls.predictions.transform.dense",
            "lm_head.norm": "lm_head.layer_norm" if roberta else "cls.predictions.transform.LayerNorm",
        },
        "sequence_classification": (
            {"classifier.dense": "classifier.dense", "classifier.out": "classifier.out_proj"}
            if roberta
            else {"classifier.out": "classifier"}
        ),
        "token_classification": {"classifier.out": "classifier"},
        "question_answering": {"classifier.out": "qa_outputs"},
    }.get(config.head, {})
    for a, b in head_modules.items():
        for p in ("weight", "bias"):
            names[f"{a}.{p}"] = f"{b}.{p}"
    if config.head == "masked_lm":
        names["lm_head.decoder.bias"] = "lm_head.bias" if roberta else "cls.predictions.bias"
    return names


def _qkv_names(config: BertConfig, i: int, p: str) -> list[str]:
    base = "" if config.head == "none" else f"{config.family}."
    return [f"{base}encoder.layer.{i}.attention.self.{n}.{p}" for n in ("query", "key", "value")]


def _decoder_names(config: BertConfig) -> tuple[str, str]:
    """The checkpoint's copies of the tied decoder weight and its bias."""
    stem = "lm_head.decoder" if config.family == "roberta" else "cls.predictions.decoder"
    return f"{stem}.weight", f"{stem}.bias"


def _is_droppable(name: str, config: BertConfig) -> bool:
    parts = name.split(".")
    return (
        parts[-1] == "position_ids"
        or name.startswith("cls.seq_relationship.")
        or (not _has_pooler(config) and "pooler" in parts)
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> a state dict for `Bert(config)`."""
    hf = {  # checkpoints converted from TensorFlow name LayerNorm's parameters gamma and beta
        name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): t
        for name, t in hf_state.items()
    }
    names = _name_map(config)
    needed = list(names.values())
    for i in range(config.n_layer):
        needed += _qkv_names(config, i, "weight") + _qkv_names(config, i, "bias")
    missing = [n for n in needed if n not in hf]
    if missing:
        raise ValueError(f"checkpoint is missing tensors for {config.family} head={config.head!r}: {missing}")

    state = {ours: hf.pop(theirs) for ours, theirs in names.items()}
    for i in range(config.n_layer):
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([hf.pop(n) for n in _qkv_names(config, i, p)])
    if config.head == "masked_lm":
        state["lm_head.decoder.weight"] = state["tok_emb.weight"]
        weight_name, bias_name = _decoder_names(config)
        hf.pop(bias_name, None)  # the same tensor as the head's bias
        decoder = hf.pop(weight_name, None)
        if decoder is not None and not torch.equal(decoder, state["tok_emb.weight"]):
            raise ValueError(f"{weight_name} differs from the word embeddings; lmforge ties the two")
    unexpected = [n for n in hf if not _is_droppable(n, config)]
    if unexpected:
        raise ValueError(f"checkpoint has tensors {config.family} head={config.head!r} does not use: {unexpected}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """A `Bert(config)` state dict -> the tensors of the matching Hugging Face model."""
    state = dict(state)
    names = _name_map(config)
    needed = list(names) + [f"blocks.{i}.attn.qkv.{p}" for i in range(config.n_layer) for p in ("weight", "bias")]
    missing = [n for n in needed if n not in state]
    if missing:
        raise ValueError(f"state dict is missing tensors for {config.family} head={config.head!r}: {missing}")
    hf = {theirs: state.pop(ours) for ours, theirs in names.items()}
    for i in range(config.n_layer):
        for p in ("weight", "bias"):
            q, k, v = state.pop(f"blocks.{i}.attn.qkv.{p}").chunk(3)
            for name, t in zip(_qkv_names(config, i, p), (q, k, v), strict=True):
                hf[name] = t.clone()
    if config.head == "masked_lm":
        state.pop("lm_head.decoder.weight", None)  # tied to tok_emb.weight
        weight_name, bias_name = _decoder_names(config)
        hf[weight_name] = hf[f"{config.family}.embeddings.word_embeddings.weight"]
        hf[bias_name] = hf[names["lm_head.decoder.bias"]]
    if state:
        raise ValueError(f"state dict has tensors {config.family} head={config.head!r} does not have: {sorted(state)}")
    return hf
