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

from lmforge.hf.common import Copy, Entry, Rename, Tie, layers, params, rename_from_hf, rename_to_hf
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
CLASSIFIERS = {  # our classifier -> HF head module, where it is a single Linear
    "sequence_classification": "classifier",
    "token_classification": "classifier",
    "question_answering": "qa_outputs",
}


def has_pooler(config: BertConfig) -> bool:
    return config.head == "none" or (
        config.head == "sequence_classification" and config.family == "bert" and config.pooling == "first"
    )


def decoder_module(config: BertConfig) -> str:
    """Where the masked-LM head keeps its output bias and the checkpoint's copy of the tied decoder weight."""
    return "lm_head." if config.family == "roberta" else "cls.predictions."


def table(config: BertConfig) -> list[Entry]:
    """Our tensors and HF's; the encoder's under "bert." / "roberta." except in the bare model."""
    base = "" if config.head == "none" else f"{config.family}."
    layer = base + "encoder.layer.{i}."  # `{i}` stays a template field inside the f-strings below
    block = [
        *params("blocks.{i}.attn.qkv", tuple(f"{layer}attention.self.{x}" for x in ("query", "key", "value"))),
        *params("blocks.{i}.attn.out", f"{layer}attention.output.dense"),
        *params("blocks.{i}.attn_norm", f"{layer}attention.output.LayerNorm"),
        *params("blocks.{i}.ffn.fc", f"{layer}intermediate.dense"),
        *params("blocks.{i}.ffn.proj", f"{layer}output.dense"),
        *params("blocks.{i}.ffn_norm", f"{layer}output.LayerNorm"),
    ]
    entries: list[Entry] = [
        Rename("tok_emb.weight", f"{base}embeddings.word_embeddings.weight"),
        Rename("pos_emb.weight", f"{base}embeddings.position_embeddings.weight"),
        Rename("type_emb.weight", f"{base}embeddings.token_type_embeddings.weight"),
        *params("emb_norm", f"{base}embeddings.LayerNorm"),
        *layers(config.n_layer, block),
    ]
    if has_pooler(config):
        entries += params("pooler", f"{base}pooler.dense")
    roberta = config.family == "roberta"
    if config.head == "masked_lm":
        decoder = decoder_module(config)
        entries += [
            *params("lm_head.dense", "lm_head.dense" if roberta else "cls.predictions.transform.dense"),
            *params("lm_head.norm", "lm_head.layer_norm" if roberta else "cls.predictions.transform.LayerNorm"),
            Rename("lm_head.decoder.bias", f"{decoder}bias"),
            Tie("lm_head.decoder.weight", "tok_emb.weight"),
            Copy(f"{decoder}decoder.weight", "tok_emb.weight"),
            Copy(f"{decoder}decoder.bias", "lm_head.decoder.bias"),
        ]
    elif config.head == "sequence_classification" and roberta:
        entries += [*params("classifier.dense", "classifier.dense"), *params("classifier.out", "classifier.out_proj")]
    elif config.head in CLASSIFIERS:
        entries += params("classifier.out", CLASSIFIERS[config.head])
    return entries


def is_droppable(name: str, config: BertConfig) -> bool:
    parts = name.split(".")
    return (
        parts[-1] == "position_ids"
        or name.startswith("cls.seq_relationship.")
        or (not has_pooler(config) and "pooler" in parts)
    )


class BertAdapter:
    """`StateDictAdapter` for BERT and RoBERTa: HF's <Bert|Roberta>Model, ...ForMaskedLM, ...ForPreTraining (read
    only), ...For{Sequence,Token}Classification and ...ForQuestionAnswering."""

    model_types = tuple(CONFIGS)

    def config_from_hf(self, hf_config: dict[str, Any], head: str | None = None) -> BertConfig:
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

    def config_to_hf(self, config: BertConfig) -> dict[str, Any]:
        """BertConfig / RobertaConfig -> a `config.json` dict for the matching Hugging Face class."""
        if config.head == "sequence_classification" and config.pooling == "mean":
            raise ValueError(
                "a mean-pooled sequence classifier (pooling='mean') has no transformers class: its "
                "ForSequenceClassification reads the first token; save it in lmforge's format (save_model, or "
                "lmforge convert SRC DST --to lmforge), which every lmforge command and ONNX export read"
            )
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

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
        """Hugging Face tensors -> a state dict for `Bert(config)`."""
        hf = {  # checkpoints converted from TensorFlow name LayerNorm's parameters gamma and beta
            name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): t
            for name, t in hf_state.items()
            if not is_droppable(name, config)
        }
        state = rename_from_hf(hf, table(config))
        stored = f"{decoder_module(config)}decoder.weight"
        if config.head == "masked_lm" and stored in hf and not torch.equal(hf[stored], state["tok_emb.weight"]):
            raise ValueError(f"{stored} differs from the word embeddings; lmforge ties the two")
        return state

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
        """A `Bert(config)` state dict -> the tensors of the matching Hugging Face model."""
        return rename_to_hf(state, table(config))
