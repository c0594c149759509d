"""How each GGUF architecture lays out a model, both ways: one `GGUFLayout` per llama.cpp architecture.

A GGUF file names its hyper-parameters `<arch>.<key>` (`llama.embedding_length`) and its tensors with
llama.cpp's names (`blk.3.attn_q.weight`). Both are mapped here onto a Hugging Face checkpoint's names, so
that the family adapters of `lmforge.hf` (one mapping table per family) do the rest in both directions:

    reading   GGUF tensor -> `from_gguf` -> HF name and layout -> ADAPTERS[family].state_dict_from_hf
    writing   ADAPTERS[family].state_dict_to_hf -> HF name and layout -> `to_gguf` -> GGUF tensor

Two architectures, llama.cpp's `llama` and `gpt2` (src/llama-arch.cpp in llama.cpp lists their tensors):

llama   llama.cpp's converter reorders the rows of each query and key head from Hugging Face's "rotate half"
        RoPE layout (feature i pairs with i + d/2) to the interleaved layout (feature 2i pairs with 2i + 1):
        within a head, row s d/2 + j moves to row 2j + s (`permute_rope_rows`); reading undoes it.
gpt2    the fused attn_qkv is HF's c_attn (q, k, v rows in that order). HF keeps GPT-2's Conv1D weights as
        (in, out), y = x W; GGUF, like nn.Linear, stores (out, in) (ggml's `mul_mat` takes the input width as
        a weight's first dimension), so those four matrices are transposed both ways.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmforge.models.build import config_from_dict
from lmforge.models.config import ModelConfig


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection from HF's rotate-half order to GGUF's interleaved one: HF row
    s d/2 + j of a head (s in {0, 1}, j < d/2) becomes row 2j + s."""
    head_dim = weight.shape[0] // n_heads
    rows = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a GGUF query/key projection back in HF's rotate-half order: GGUF row 2j + s of a head is HF
    row s d/2 + j (view the head's rows as (d/2, 2), swap the two axes, flatten)."""
    head_dim = weight.shape[0] // n_heads
    rows = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


class GGUFLayout:
    """One GGUF architecture: its name, our family, and GGUF tensor stems <-> HF module names.

    `layer_names` maps a stem after `blk.N.` to the HF module after `<layer_prefix>N.`; `top_names` maps the
    other stems. Subclasses add the config both ways and any change of a tensor's layout."""

    architecture: ClassVar[str]
    family: ClassVar[str]
    layer_prefix: ClassVar[str]
    layer_names: ClassVar[dict[str, str]]
    top_names: ClassVar[dict[str, str]]

    def hf_name(self, gguf_name: str) -> str:
        """The HF name (without the backbone prefix) of a GGUF tensor name; unknown names are an error."""
        stem, _, param = gguf_name.rpartition(".")
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in self.layer_names:
            return f"{self.layer_prefix}{parts[1]}.{self.layer_names[parts[2]]}.{param}"
        if stem in self.top_names:
            return f"{self.top_names[stem]}.{param}"
        raise ValueError(
            f"GGUF tensor {gguf_name!r} has no place in lmforge's {self.family} "
            f"(unsupported {self.architecture} variant)"
        )

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of an HF tensor name (without the backbone prefix)."""
        module, _, param = hf_name.rpartition(".")
        if module.startswith(self.layer_prefix):
            index, _, rest = module.removeprefix(self.layer_prefix).partition(".")
            stems = {hf: stem for stem, hf in self.layer_names.items()}
            if rest in stems:
                return f"blk.{index}.{stems[rest]}.{param}"
        stems = {hf: stem for stem, hf in self.top_names.items()}
        if module in stems:
            return f"{stems[module]}.{param}"
        raise ValueError(f"{hf_name} has no GGUF name in llama.cpp's {self.architecture} architecture")

    def from_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """A GGUF tensor in the layout HF keeps it (identity unless the architecture says otherwise)."""
        return values

    def to_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """An HF tensor in the layout GGUF keeps it (the inverse of `from_gguf`)."""
        return values

    def check_exportable(self, config: ModelConfig) -> None:
        """Refuse, naming the field, a config llama.cpp's architecture cannot represent."""

    def config_from_gguf(self, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
        raise NotImplementedError

    def metadata(self, config: ModelConfig) -> dict[str, Any]:
        """The `<arch>.*` hyper-parameter keys (without the `<arch>.` prefix) llama.cpp reads for `config`."""
        raise NotImplementedError


def need(meta: dict[str, Any], key: str, architecture: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}; the file is not a complete {architecture} model")
    return meta[key]


def vocab_size_of(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], architecture: str) -> int:
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError(f"GGUF file has no token_embd.weight tensor; the file is not a complete {architecture} model")
    rows = tensor_shapes["token_embd.weight"][0]
    vocab_size = len(meta.get("tokenizer.ggml.tokens", ())) or meta.get(f"{architecture}.vocab_size", rows)
    if vocab_size != rows:
        raise ValueError(f"GGUF vocabulary has {vocab_size} tokens but token_embd.weight has {rows} rows")
    return vocab_size


class LlamaLayout(GGUFLayout):
    architecture, family, layer_prefix = "llama", "llama", "layers."
    layer_names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    top_names = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

    def heads_of(self, hf_name: str, config: ModelConfig) -> int | None:
        if hf_name.endswith("q_proj.weight"):
            return config.n_head
        if hf_name.endswith("k_proj.weight"):
            return config.n_kv_heads or config.n_head
        return None

    def from_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        heads = self.heads_of(hf_name, config)
        return values if heads is None else unpermute_rope_rows(values, heads)

    def to_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        heads = self.heads_of(hf_name, config)
        return values if heads is None else permute_rope_rows(values, heads)

    def check_exportable(self, config: ModelConfig) -> None:
        unsupported = {
            "attention_bias": config.attention_bias,
            "attention_out_bias": config.attention_out_bias,
            "mlp_bias": config.mlp_bias,
            "qk_norm": config.qk_norm,
            "rope_scaling": config.rope_scaling,
        }
        found = {k: v for k, v in unsupported.items() if v}
        if found:
            raise ValueError(
                f"llama with {found} is not exported to GGUF; lmforge writes the plain Llama layer (no biases, "
                "no QK-norm, unscaled RoPE)"
            )

    def config_from_gguf(self, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
        """LlamaConfig from `llama.*` metadata; `tensor_shapes` (torch order) settles tying and the vocab."""
        scaling = meta.get("llama.rope.scaling.type", "none")
        if scaling != "none" or "rope_freqs.weight" in tensor_shapes:
            raise ValueError(f"GGUF RoPE scaling ({scaling}, rope_freqs) is not supported; only unscaled RoPE loads")
        d_model = need(meta, "llama.embedding_length", "llama")
        n_head = need(meta, "llama.attention.head_count", "llama")
        n_kv_heads = meta.get("llama.attention.head_count_kv", n_head)
        head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", d_model // n_head))
        values = dict(
            family="llama",
            head="causal_lm",
            vocab_size=vocab_size_of(meta, tensor_shapes, "llama"),
            max_seq_len=meta.get("llama.context_length", 2048),
            n_layer=need(meta, "llama.block_count", "llama"),
            n_head=n_head,
            n_kv_heads=None if n_kv_heads == n_head else n_kv_heads,
            d_model=d_model,
            d_ff=need(meta, "llama.feed_forward_length", "llama"),
            head_dim=None if head_dim == d_model // n_head else head_dim,
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in tensor_shapes,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        return config_from_dict(values)  # checks each value's type: the metadata's types are the writer's choice

    def metadata(self, config: ModelConfig) -> dict[str, Any]:
        keys = {
            "vocab_size": config.vocab_size,
            "context_length": config.max_seq_len,
            "embedding_length": config.d_model,
            "feed_forward_length": config.ffn_dim,
            "block_count": config.n_layer,
            "attention.head_count": config.n_head,
            "attention.head_count_kv": config.n_kv_heads or config.n_head,
            "attention.layer_norm_rms_epsilon": float(config.norm_eps),
            "rope.freq_base": float(config.rope_theta),
            "rope.dimension_count": config.head_width,
        }
        if config.head_width != config.d_model // config.n_head:
            keys.update({"attention.key_length": config.head_width, "attention.value_length": config.head_width})
        return keys


CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class GPT2Layout(GGUFLayout):
    architecture, family, layer_prefix = "gpt2", "gpt", "h."
    layer_names = {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    }
    top_names = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"}

    def from_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        return values.t() if hf_name.endswith(tuple(f"{m}.weight" for m in CONV1D_MODULES)) else values

    def to_gguf(self, hf_name: str, values: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        return self.from_gguf(hf_name, values, config)  # a transpose is its own inverse

    def check_exportable(self, config: ModelConfig) -> None:
        if not config.bias or config.activation != "gelu_tanh":
            raise ValueError(
                f"gpt with bias={config.bias}, activation={config.activation!r} is not exported to GGUF; llama.cpp's "
                "gpt2 layer has biases and the tanh GELU (bias=True, activation='gelu_tanh')"
            )

    def config_from_gguf(self, meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
        """GPTConfig from `gpt2.*` metadata (biases and the tanh GELU are part of llama.cpp's gpt2 layer)."""
        d_model = need(meta, "gpt2.embedding_length", "gpt2")
        values = dict(
            family="gpt",
            head="causal_lm",
            vocab_size=vocab_size_of(meta, tensor_shapes, "gpt2"),
            max_seq_len=need(meta, "gpt2.context_length", "gpt2"),
            n_layer=need(meta, "gpt2.block_count", "gpt2"),
            n_head=need(meta, "gpt2.attention.head_count", "gpt2"),
            d_model=d_model,
            d_ff=need(meta, "gpt2.feed_forward_length", "gpt2"),
            norm_eps=float(meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)),
            activation="gelu_tanh",
            bias=True,
            tie_embeddings="output.weight" not in tensor_shapes,
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        return config_from_dict(values)

    def metadata(self, config: ModelConfig) -> dict[str, Any]:
        return {
            "vocab_size": config.vocab_size,
            "context_length": config.max_seq_len,
            "embedding_length": config.d_model,
            "feed_forward_length": config.ffn_dim,
            "block_count": config.n_layer,
            "attention.head_count": config.n_head,
            "attention.layer_norm_epsilon": float(config.norm_eps),
        }


LAYOUTS: dict[str, GGUFLayout] = {layout.architecture: layout for layout in (LlamaLayout(), GPT2Layout())}
"""GGUF architecture name -> its layout."""
BY_FAMILY: dict[str, GGUFLayout] = {layout.family: layout for layout in LAYOUTS.values()}
"""lmforge family -> the GGUF layout it is written in."""
