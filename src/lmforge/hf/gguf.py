"""Llama models from GGUF files (llama.cpp's single-file format), dequantised to float tensors.

A GGUF file holds typed key/value metadata (the architecture's sizes, the tokenizer) followed by tensors,
each stored as raw bytes of one GGML type at a recorded offset. `load_gguf` reads it with the `gguf`
package's `GGUFReader`, builds a `LlamaConfig` from the `llama.*` keys, dequantises every tensor to
float32 and maps the names onto our Llama. Quantised types store blocks of 32 consecutive weights of a row
(GGML's documented layouts, ggml/src/ggml-common.h):

    Q8_0  fp16 d, 32 x int8 q                          x_i = d q_i
    Q4_0  fp16 d, 16 bytes of 4-bit q                  x_i = d (q_i - 8)
    Q4_1  fp16 d, fp16 m, 16 bytes of 4-bit q          x_i = d q_i + m

In the 4-bit types byte j holds element j in its low nibble and element j + 16 in its high nibble.

llama.cpp's converter reorders the rows of each query and key head from Hugging Face's "rotate half" RoPE
layout (feature i pairs with i + d/2) to the interleaved layout (feature 2i pairs with 2i + 1): within a
head, row s d/2 + j moves to row 2j + s. `unpermute_rope_rows` undoes it, since our RoPE rotates halves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.hf.llama import state_dict_from_hf
from lmforge.models.llama import Llama, LlamaConfig
from lmforge.nn import RotaryEmbedding

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)
# GGML type id -> (name, weights per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
}
SUPPORTED_TYPES = [name for name, _, _ in GGML_TYPES.values()]
# GGUF tensor name (after `blk.N.`) -> Hugging Face Llama name (after `layers.N.`)
LAYER_NAMES = {
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
TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def dequantize(raw: np.ndarray, type_id: int) -> np.ndarray:
    """Float32 values of `raw` (uint8 bytes, a whole number of blocks) stored as GGML type `type_id`."""
    name = ggml_type_name(type_id)
    if name == "F32":
        return raw.view(np.float32).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if name == "BF16":  # the top 16 bits of a float32
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    _, _, block_bytes = GGML_TYPES[type_id]
    blocks = raw.reshape(-1, block_bytes)  # (n_blocks, block_bytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if name == "Q8_0":
        return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    nibbles = blocks[:, -16:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if name == "Q4_0":
        return (d * (q - 8.0)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(-1)


def ggml_type_name(type_id: int) -> str:
    if type_id not in GGML_TYPES:
        try:
            import gguf

            name = gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            name = f"unknown type {type_id}"
        raise ValueError(
            f"GGML tensor type {name} is not supported; lmforge dequantises {SUPPORTED_TYPES} "
            f"(re-quantise the model to one of them, e.g. with llama.cpp's llama-quantize)"
        )
    return GGML_TYPES[type_id][0]


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a GGUF query/key projection back in HF's rotate-half order.

    GGUF row 2j + s of a head (s in {0, 1}, j < d/2) is HF row s d/2 + j: view the head's rows as (d/2, 2),
    swap the two axes, flatten."""
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    rows = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.transpose(1, 2).reshape(weight.shape)


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path`, with one-line errors for a missing, foreign or damaged file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct or numpy errors on bad bytes
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt, download it again"
        ) from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes} "
                f"but the file has {size}; download it again"
            )
    return reader


def field_value(field) -> Any:
    """A GGUF metadata value as Python: str, int, float, bool or a list of those."""
    from gguf import GGUFValueType

    def scalar(part: np.ndarray, kind: GGUFValueType) -> Any:
        return bytes(part).decode("utf-8") if kind == GGUFValueType.STRING else part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def read_metadata(reader, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every metadata key of the file except those starting with a prefix in `skip`."""
    return {
        key: field_value(field)
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and not key.startswith(skip)
    }


def config_from_gguf(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> LlamaConfig:
    """LlamaConfig from `llama.*` metadata; `tensor_shapes` (torch order) settles tying and the vocab."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; lmforge loads {list(SUPPORTED_ARCHITECTURES)} GGUF files"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_shapes:
        raise ValueError(f"GGUF RoPE scaling ({scaling}, rope_freqs) is not supported; only unscaled RoPE loads")

    def need(key: str) -> Any:
        if key not in meta:
            raise ValueError(f"GGUF metadata lacks {key!r}; the file is not a complete llama model")
        return meta[key]

    d_model, n_head = need("llama.embedding_length"), need("llama.attention.head_count")
    n_kv_heads = meta.get("llama.attention.head_count_kv", n_head)
    head_dim = meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", d_model // n_head))
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor; the file is not a complete llama model")
    embedding_rows = tensor_shapes["token_embd.weight"][0]
    vocab_size = len(meta.get("tokenizer.ggml.tokens", ())) or meta.get("llama.vocab_size", embedding_rows)
    if vocab_size != embedding_rows:
        raise ValueError(f"GGUF vocabulary has {vocab_size} tokens but token_embd.weight has {embedding_rows} rows")
    return LlamaConfig(
        head="causal_lm",
        vocab_size=vocab_size,
        max_seq_len=meta.get("llama.context_length", 2048),
        n_layer=need("llama.block_count"),
        n_head=n_head,
        n_kv_heads=None if n_kv_heads == n_head else n_kv_heads,
        d_model=d_model,
        d_ff=need("llama.feed_forward_length"),
        head_dim=None if head_dim == d_model // n_head else head_dim,
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_shapes,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def hf_name(gguf_name: str) -> str:
    """HF Llama name (without `model.`) of a GGUF tensor name; unknown names are an error."""
    stem, _, param = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{param}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{param}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in lmforge's Llama (unsupported llama variant)")


def tensor_values(reader, tensor) -> torch.Tensor:
    """The float32 tensor (torch shape order: GGUF lists dimensions fastest-first) of one GGUF tensor."""
    type_id = int(tensor.tensor_type)
    _, block_size, block_bytes = GGML_TYPES[type_id]
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    n_values = int(np.prod(shape))
    if n_values % block_size or tensor.n_bytes != n_values // block_size * block_bytes:
        raise ValueError(f"GGUF tensor {tensor.name} of shape {shape} has {tensor.n_bytes} bytes, not whole blocks")
    raw = reader.data[tensor.data_offset : tensor.data_offset + tensor.n_bytes]
    return torch.from_numpy(dequantize(np.asarray(raw), type_id).reshape(shape))


def state_dict_from_gguf(reader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our state dict: dequantised tensors, q/k rows un-permuted, then the HF Llama mapping."""
    n_kv = config.n_kv_heads or config.n_head
    for tensor in reader.tensors:
        ggml_type_name(int(tensor.tensor_type))  # refuse unsupported types before dequantising anything
    hf = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        values = tensor_values(reader, tensor)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, config.n_head)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, n_kv)
        hf[name] = values
    return state_dict_from_hf(hf, config)


def llama_from_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor]) -> Llama:
    """A Llama holding `state`'s tensors, built without drawing random weights first (1.8 s at 135M):
    modules are made on the meta device, the tensors assigned, and RoPE's computed (unsaved) frequency
    buffer made afresh."""
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, assign=True)
    model.rope = RotaryEmbedding(config.head_width, config.rope_theta, config.rope_scaling)
    if model.lm_head is not None and config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors {left} were not filled from the GGUF file; lmforge's Llama has changed")
    return model


def load_gguf(path: str | Path, dtype: torch.dtype | None = None) -> Llama:
    """A Llama (causal LM, eval mode) with the weights of a llama-architecture GGUF file, dequantised to
    float32 (or `dtype`). Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1."""
    reader = open_gguf(path)
    meta = read_metadata(reader, skip=("tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    config = config_from_gguf(meta, shapes)
    model = llama_from_state_dict(config, state_dict_from_gguf(reader, config))
    if dtype is not None:
        model.to(dtype)
    return model.eval()
