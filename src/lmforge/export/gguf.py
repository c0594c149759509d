"""`export_gguf`: an lmforge Llama or GPT as one GGUF file that llama.cpp (and ollama) runs.

The file is written with the `gguf` package's `GGUFWriter`, the writer llama.cpp's own converter uses:

  metadata   general.* (name, file type, quantisation version); the architecture's hyper-parameters under
             llama.cpp's keys (`lmforge.hf.gguf_layouts`: `llama.embedding_length`, `gpt2.block_count`, ...);
             the tokenizer as llama.cpp's `gpt2` (byte-level BPE) model: tokens in id order, their types
             (normal, control = special, user-defined = added), merges, the pre-tokenizer's name, the special
             ids, whether a BOS is prepended, and the chat template.
  tensors    llama.cpp's names and layouts (`GGUFLayout.gguf_name`, `to_gguf`), each 2-D weight in the chosen
             type, every 1-D tensor (norm gains, biases) and GPT-2's position table in F32, as llama.cpp's
             converter keeps them.

The types (ggml/src/ggml-common.h), for a row cut into blocks of 32 weights:

    f32, f16, bf16   one float per weight (bf16: the top 16 bits of the float32)
    q8_0             per block an fp16 scale d = max|x| / 127 and 32 int8 q = round(x / d)      8.5 bits/weight
    q4_0             per block an fp16 d = m / -8 (m the entry of largest magnitude, sign kept) and
                     32 4-bit q = round(x / d) + 8 in [0, 15], x ~= d (q - 8)                  4.5 bits/weight

quantised by `gguf.quants.quantize`, a NumPy port of ggml's reference quantisers (bit-exact with them).
Every 2-D weight gets the type ("pure" in llama-quantize's words: no mixed precision); a weight whose rows
are not whole blocks of 32 falls back to f16, as llama.cpp's converter does.

The file appears only complete: it is written beside the destination and renamed into place (`lmforge.io`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.tokenizers.tokenizer import GGUF_SPLITS, Tokenizer
from lmforge.hf import ADAPTERS
from lmforge.hf.gguf_layouts import BY_FAMILY, GGUFLayout
from lmforge.io import atomic_path

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # weights per block of the quantised types


def quant_types() -> dict[str, tuple[Any, Any]]:
    """--type name -> (GGMLQuantizationType of 2-D weights, LlamaFileType recorded in general.file_type)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
        "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
    }


def layout_for(config) -> GGUFLayout:
    """The GGUF layout of a model's family, after checking llama.cpp can run this config."""
    if config.family not in BY_FAMILY:
        raise ValueError(
            f"family {config.family!r} cannot be exported to GGUF; supported families: {sorted(BY_FAMILY)}"
        )
    if config.head != "causal_lm":
        raise ValueError(f"head={config.head!r} cannot be exported to GGUF; llama.cpp runs causal_lm models only")
    layout = BY_FAMILY[config.family]
    layout.check_exportable(config)
    return layout


def check_gguf_destination(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} must end in .gguf (llama.cpp and lmforge recognise GGUF files by it)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another file name or replace it (--overwrite)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {out.parent} does not exist; create it first")


def export_gguf(
    model: nn.Module,
    tokenizer: Tokenizer,
    out: str | Path,
    gguf_type: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write `model` (a Llama or GPT with a causal-LM head) and `tokenizer` to the GGUF file `out`, 2-D weights
    in `gguf_type` (one of GGUF_TYPES). Returns `out`. Reload with `lmforge.hf.load_model(out)`."""
    import gguf

    out = Path(out)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--type {gguf_type!r} is not supported; choose one of {list(GGUF_TYPES)}")
    config = model.config
    layout = layout_for(config)
    check_gguf_destination(out, overwrite)
    tokens = tokenizer_metadata(tokenizer, config.vocab_size)
    weight_type, file_type = quant_types()[gguf_type]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), layout.architecture)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in layout.metadata(config).items():
            add_value(writer, f"{layout.architecture}.{key}", value)
        for key, value in tokens.items():
            add_value(writer, key, value)
        for gguf_name, values in gguf_tensors(model, layout):
            qtype = tensor_type(gguf_name, values, weight_type)
            data = values.numpy()
            if qtype != gguf.GGMLQuantizationType.F32:
                data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def gguf_tensors(model: nn.Module, layout: GGUFLayout) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in GGUF's layout) for each tensor of the model; a tied output is left out
    (llama.cpp then reads token_embd for it, as lmforge's reader does)."""
    config = model.config
    hf = ADAPTERS[config.family].state_dict_to_hf(model.state_dict(), config)
    tensors = []
    for hf_name, values in hf.items():
        name = hf_name.removeprefix("model.").removeprefix("transformer.")
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        values = layout.to_gguf(name, values.detach().float(), config).contiguous()
        tensors.append((layout.gguf_name(name), values))
    return tensors


def tensor_type(gguf_name: str, values: torch.Tensor, weight_type):
    """The GGML type a tensor is stored in: F32 for 1-D tensors and the position table, `weight_type` for
    2-D weights, F16 when a quantised type's blocks of 32 do not tile the rows."""
    from gguf import GGMLQuantizationType as Q

    if values.ndim == 1 or gguf_name.startswith("position_embd"):
        return Q.F32
    if weight_type in (Q.Q8_0, Q.Q4_0) and values.shape[-1] % BLOCK:
        return Q.F16
    return weight_type


def add_value(writer, key: str, value: Any) -> None:
    """One metadata key with the GGUF type llama.cpp reads it as (u32 sizes, f32 constants, bool flags, arrays
    of strings or int32)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) of a byte-level BPE's pre-tokenizer, read from its tokenizer.json:
    ByteLevel with GPT-2's regex is `gpt-2` (llama.cpp's spelling: it refuses `gpt2`); single digits then
    ByteLevel is SmolLM2's `smollm`; a Split on a known regex then ByteLevel without one is that regex's name
    (`llama-bpe`, `qwen2`)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds and kinds[-1] == "ByteLevel" and not spec.get("normalizer"):
        regex = steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex:
            pattern = steps[0].get("pattern", {}).get("Regex")
            for name, split in GGUF_SPLITS.items():
                if split is not None and split == pattern:
                    return name
    raise ValueError(
        f"the tokenizer's pre-tokenizer ({kinds or 'none'}) has no llama.cpp equivalent; GGUF export supports "
        "byte-level BPE tokenizers with GPT-2's, SmolLM2's, Llama 3's or Qwen2's splitting"
    )


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` keys of a byte-level BPE tokenizer for a model of `vocab_size` rows; ids the tokenizer
    does not use (a vocabulary padded to a round size) become `[PAD<id>]` tokens of type UNUSED, as in
    llama.cpp's converter."""
    from gguf import TokenType

    backend = tokenizer.to_tokenizers()
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(
            f"the tokenizer is a {model.get('type')} model; GGUF export writes byte-level BPE tokenizers only"
        )
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} rows")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, int(TokenType.NORMAL)
    for index, added in backend.get_added_tokens_decoder().items():
        tokens[index] = added.content
        types[index] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    tokens = [token if token is not None else f"[PAD{i}]" for i, token in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_tokenizer_name(spec),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, attribute in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        index = tokenizer.token_to_id(getattr(tokenizer, f"{attribute}_token"))
        if index is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = index
    plain, marked = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos = tokenizer.bos_token_id
    meta["tokenizer.ggml.add_bos_token"] = bool(bos is not None and marked[:1] == [bos] and plain[:1] != [bos])
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def export_gguf_file(source: str | Path, out: str | Path, gguf_type: str = "f16", overwrite: bool = False) -> str:
    """Load the model `source` names (any of `lmforge.hf.resolve`'s kinds but a preset) with its tokenizer,
    write it to `out` as GGUF; returns a one-line summary."""
    from lmforge.data.tokenizers.tokenizer import load_tokenizer
    from lmforge.hf.load import load_model
    from lmforge.hf.resolve import resolve_model

    out = Path(out)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--type {gguf_type!r} is not supported; choose one of {list(GGUF_TYPES)}")
    check_gguf_destination(out, overwrite)  # before minutes of loading
    path = resolve_model(source, presets=False).path
    model = load_model(path, dtype=torch.float32)
    layout_for(model.config)
    tokenizer = load_tokenizer(path)
    export_gguf(model, tokenizer, out, gguf_type, overwrite, name=Path(str(source)).stem)
    size = out.stat().st_size / 2**20
    return f"wrote {out}: GGUF {gguf_type}, {layout_for(model.config).architecture}, {size:.1f} MiB"
