"""T5 <-> Hugging Face `transformers` (model_type "t5": T5ForConditionalGeneration, T5Model).

Hugging Face keeps separate q, k, v Linears; ours fuse them (self-attention `qkv` = [q; k; v] by rows,
cross-attention `kv` = [k; v]), so loading concatenates and saving splits. Only the first block of each
stack holds `relative_attention_bias`; ours keeps it once per stack as `position_bias`.

v1.0 vs v1.1: older configs say `tie_word_embeddings: false` for v1.1. Transformers 5 always ties the
lm_head to `shared` unless a checkpoint holds both with different values, and records the v1.0 output
scaling in `scale_decoder_outputs` instead; we read either and write both. The aliases
`encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (and `lm_head.weight` of a tied model) are
the shared matrix again: accepted on load, not written on save, as `save_pretrained` does.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.hf.common import Entry, Fuse, Rename, Tie, layers, rename_from_hf, rename_to_hf
from lmforge.models.t5 import T5Config

ARCHITECTURES = {"T5ForConditionalGeneration": "seq2seq_lm", "T5Model": "none"}
# feed_forward_proj -> (ffn, activation). "gated-gelu" is the tanh GELU (HF's gelu_new), as in v1.1.
FEED_FORWARD = {
    "relu": ("mlp", "relu"),
    "gelu": ("mlp", "gelu"),
    "gelu_new": ("mlp", "gelu_tanh"),
    "gelu_pytorch_tanh": ("mlp", "gelu_tanh"),
    "silu": ("mlp", "silu"),
    "gated-gelu": ("geglu", "gelu_tanh"),
    "gated-gelu_new": ("geglu", "gelu_tanh"),
    "gated-gelu_pytorch_tanh": ("geglu", "gelu_tanh"),
}
WRITE_FEED_FORWARD = {
    ("mlp", "relu"): "relu",
    ("mlp", "gelu"): "gelu",
    ("mlp", "gelu_tanh"): "gelu_new",
    ("mlp", "silu"): "silu",
    ("geglu", "gelu_tanh"): "gated-gelu",
}
SHARED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in some old checkpoints, never used: cross-attention has no position bias.
UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def block(config: T5Config, stack: str) -> list[Rename | Fuse]:
    """One layer of `stack` ("encoder" or "decoder"), `{i}` its index. HF numbers the sublayers: 0 self-attention,
    then (decoder only) 1 cross-attention, then the feed-forward."""
    ours, hf = stack + ".blocks.{i}.", stack + ".block.{i}.layer."  # `{i}` stays a template field in the f-strings
    attn = f"{hf}0.SelfAttention."
    entries: list[Rename | Fuse] = [
        Fuse(f"{ours}attn.qkv.weight", (f"{attn}q.weight", f"{attn}k.weight", f"{attn}v.weight")),
        Rename(f"{ours}attn.out.weight", f"{attn}o.weight"),
        Rename(f"{ours}attn_norm.weight", f"{hf}0.layer_norm.weight"),
    ]
    ff = f"{hf}1."
    if stack == "decoder":
        cross, ff = f"{hf}1.EncDecAttention.", f"{hf}2."
        entries += [
            Rename(f"{ours}cross_attn.q.weight", f"{cross}q.weight"),
            Fuse(f"{ours}cross_attn.kv.weight", (f"{cross}k.weight", f"{cross}v.weight")),
            Rename(f"{ours}cross_attn.out.weight", f"{cross}o.weight"),
            Rename(f"{ours}cross_norm.weight", f"{hf}1.layer_norm.weight"),
        ]
    dense = f"{ff}DenseReluDense."
    if config.ffn == "geglu":
        entries += [
            Rename(f"{ours}ffn.gate.weight", f"{dense}wi_0.weight"),
            Rename(f"{ours}ffn.up.weight", f"{dense}wi_1.weight"),
            Rename(f"{ours}ffn.down.weight", f"{dense}wo.weight"),
        ]
    else:
        entries += [
            Rename(f"{ours}ffn.fc.weight", f"{dense}wi.weight"),
            Rename(f"{ours}ffn.proj.weight", f"{dense}wo.weight"),
        ]
    entries.append(Rename(f"{ours}ffn_norm.weight", f"{ff}layer_norm.weight"))
    return entries


def table(config: T5Config) -> list[Entry]:
    """Our tensors and HF's: the shared embedding, then each stack's position bias, final norm and layers."""
    entries: list[Entry] = [Rename("shared.weight", "shared.weight")]
    for stack, n_layer in (("encoder", config.n_layer), ("decoder", config.decoder_layers)):
        entries += [
            Rename(
                f"{stack}.position_bias.embedding.weight",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ),
            Rename(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight"),
            *layers(n_layer, block(config, stack)),
        ]
    if config.head == "seq2seq_lm" and config.tie_embeddings:
        entries.append(Tie("lm_head.weight", "shared.weight"))  # not written: save_pretrained does not store it
    elif config.head == "seq2seq_lm":
        entries.append(Rename("lm_head.weight", "lm_head.weight"))
    return entries


class T5Adapter:
    """`StateDictAdapter` for T5: HF's T5ForConditionalGeneration and T5Model."""

    model_types = ("t5",)

    def config_from_hf(self, hf_config: dict[str, Any], head: str | None = None) -> T5Config:
        """Our config from a Hugging Face T5 `config.json` dict; `head` overrides what `architectures` implies."""
        if hf_config.get("model_type", "t5") != "t5":
            raise ValueError(f"model_type={hf_config['model_type']!r} is not 't5'")
        if head is None:
            head = "seq2seq_lm"
            for arch in hf_config.get("architectures") or []:
                if arch not in ARCHITECTURES:
                    raise ValueError(f"architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
                head = ARCHITECTURES[arch]
        proj = hf_config.get("feed_forward_proj", "relu")
        if proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj={proj!r} is not supported; supported: {sorted(FEED_FORWARD)}")
        ffn, activation = FEED_FORWARD[proj]
        tie = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
        n_layer, n_decoder_layer = hf_config.get("num_layers", 6), hf_config.get("num_decoder_layers")
        return T5Config(
            head=head,
            vocab_size=hf_config.get("vocab_size", 32128),
            d_model=hf_config.get("d_model", 512),
            head_dim=hf_config.get("d_kv", 64),
            d_ff=hf_config.get("d_ff", 2048),
            n_layer=n_layer,
            n_decoder_layer=None if n_decoder_layer == n_layer else n_decoder_layer,
            n_head=hf_config.get("num_heads", 8),
            ffn=ffn,
            activation=activation,
            relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
            dropout=hf_config.get("dropout_rate", 0.1),
            norm_eps=hf_config.get("layer_norm_epsilon", 1e-6),
            tie_embeddings=tie is not False,
            pad_token_id=hf_config.get("pad_token_id", 0),
            decoder_start_token_id=hf_config.get("decoder_start_token_id", 0),
            eos_token_id=hf_config.get("eos_token_id", 1),
        )

    def config_to_hf(self, config: T5Config) -> dict[str, Any]:
        """A Hugging Face T5 `config.json` dict for this config (both tying flags written, see above)."""
        c = config
        if (c.ffn, c.activation) not in WRITE_FEED_FORWARD:
            raise ValueError(
                f"ffn={c.ffn!r} with activation={c.activation!r} has no Hugging Face T5 equivalent; "
                f"supported: {sorted(WRITE_FEED_FORWARD)}"
            )
        arch = {v: k for k, v in ARCHITECTURES.items()}[c.head]
        return {
            "architectures": [arch],
            "model_type": "t5",
            "is_encoder_decoder": True,
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "d_kv": c.head_dim,
            "d_ff": c.d_ff,
            "num_layers": c.n_layer,
            "num_decoder_layers": c.decoder_layers,
            "num_heads": c.n_head,
            "feed_forward_proj": WRITE_FEED_FORWARD[(c.ffn, c.activation)],
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "dropout_rate": c.dropout,
            "layer_norm_epsilon": c.norm_eps,
            "initializer_factor": 1.0,
            "tie_word_embeddings": c.tie_embeddings,
            "scale_decoder_outputs": c.tie_embeddings,
            "pad_token_id": c.pad_token_id,
            "decoder_start_token_id": c.decoder_start_token_id,
            "eos_token_id": c.eos_token_id,
        }

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
        """Our state dict from a HF T5 one, its aliases of `shared` accepted (see above)."""
        hf = dict(hf_state)
        hf.pop(UNUSED, None)
        aliases = [hf.pop(k) for k in SHARED_ALIASES if k in hf]
        if "shared.weight" not in hf and aliases:
            hf["shared.weight"] = aliases[0]
        tied = config.head == "seq2seq_lm" and config.tie_embeddings
        if config.head == "seq2seq_lm" and not tied and "lm_head.weight" not in hf and "shared.weight" in hf:
            hf["lm_head.weight"] = hf["shared.weight"]  # Transformers 5 drops a lm_head tied to `shared`
        if tied or config.head == "none":
            hf.pop("lm_head.weight", None)  # the tied alias (tied) or a head the model does not have (none)
        return rename_from_hf(hf, table(config))

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: T5Config) -> dict[str, torch.Tensor]:
        """The HF T5 state dict of our state dict, without the aliases of `shared` (as `save_pretrained` writes)."""
        return rename_to_hf(state, table(config))
