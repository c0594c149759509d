"""Sampling defaults: what a model records about how it should be decoded, and how that combines with a
command's flags and a request's fields.

Precedence, highest first: a request's own fields (the HTTP API) > the command's flags > the model's
recorded defaults > the command's built-in defaults (shown in its `--help`).

What a model records (`model_defaults(path)`):
- a folder (Hugging Face or lmforge) may hold `generation_config.json`, transformers' `GenerationConfig`:
  `do_sample`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `max_new_tokens`,
  `eos_token_id` (one id or a list). As in transformers, a file without `"do_sample": true` asks for
  greedy decoding (SmolLM2-Instruct's holds only token ids: transformers decodes it greedily).
- a GGUF file may hold llama.cpp's `general.sampling.*` keys: `temp`, `top_p`, `top_k`, `min_p`,
  `penalty_repeat`.
Fields a model does not record are left to the next layer down.

Temperature 0 stands for greedy decoding here, as in OpenAI's API and `lmforge generate --temperature 0`.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"
GGUF_SAMPLING_KEYS = {  # llama.cpp's general.sampling.* key -> our field
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass(frozen=True)
class SamplingDefaults:
    """One layer of defaults; None: this layer does not set the field."""

    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] | None = None

    def over(self, *lower: SamplingDefaults) -> SamplingDefaults:
        """Each field from the first layer that sets it: this one, then `lower` in order."""
        values = {}
        for field in fields(self):
            layers = (getattr(layer, field.name) for layer in (self, *lower))
            values[field.name] = next((v for v in layers if v is not None), None)
        return replace(self, **values)

    def end_ids(self, tokenizer_eos: int | None) -> list[int] | None:
        """The tokenizer's end-of-sequence id and those the model records (Llama 3 ends a turn with either of
        two tokens), each once; None when neither has one (the engine then takes the model config's)."""
        ids = [i for i in (tokenizer_eos, *(self.eos_token_id or ())) if i is not None]
        return list(dict.fromkeys(ids)) or None

    def stream_options(self) -> dict[str, Any]:
        """The `lmforge.generate.stream` keywords of these (fully set) sampling fields."""
        greedy = self.temperature == 0
        return dict(
            do_sample=not greedy,
            temperature=1.0 if greedy else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )


OPENAI_DEFAULTS = SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
"""What OpenAI's API assumes for a sampling field a request leaves out (top_k, min_p and repetition_penalty,
vLLM's extensions, off): the bottom layer of `lmforge serve`'s defaults."""


def model_defaults(model: str | Path) -> SamplingDefaults:
    """The defaults `model` records (a folder's generation_config.json, a GGUF's general.sampling.*); none for
    a preset name or a folder without the file."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return gguf_defaults(path)
    if (path / GENERATION_CONFIG).is_file():
        return generation_config_defaults(path / GENERATION_CONFIG)
    return SamplingDefaults()


def generation_config_defaults(path: Path) -> SamplingDefaults:
    """The fields of a transformers generation_config.json we decode with; a wrong type is an error naming the
    file and the field."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid UTF-8 JSON ({error}); fix or delete it") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")

    def get(name: str, kinds: tuple[type, ...]) -> Any:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
            expected = " or ".join(k.__name__ for k in kinds)
            raise ValueError(f"{path}: {name} must be {expected}, got {json.dumps(value)[:40]}; fix the file")
        return value

    numbers = (int, float)
    sampled = get("do_sample", (bool,)) is True
    eos = values.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos_ids is not None and not (
        isinstance(eos_ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids)
    ):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {json.dumps(eos)[:40]}")
    temperature = get("temperature", numbers)
    return SamplingDefaults(
        temperature=(1.0 if temperature is None else float(temperature)) if sampled else 0.0,
        top_p=get("top_p", numbers),
        top_k=get("top_k", (int,)),
        min_p=get("min_p", numbers),
        repetition_penalty=get("repetition_penalty", numbers),
        max_new_tokens=get("max_new_tokens", (int,)),
        eos_token_id=tuple(eos_ids) if eos_ids else None,
    )


def gguf_defaults(path: Path) -> SamplingDefaults:
    """The general.sampling.* values a GGUF file records (llama.cpp's names, our fields)."""
    found = {GGUF_SAMPLING_KEYS[k]: v for k, v in gguf_header_values(path, tuple(GGUF_SAMPLING_KEYS)).items()}
    if "top_k" in found:
        found["top_k"] = int(found["top_k"])  # an int32, unless a writer stored it as a float
    return SamplingDefaults(**found)


def gguf_header_values(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The numeric and boolean metadata values of `keys` in a GGUF file, read from its header alone.

    `gguf.GGUFReader` parses every metadata array into numpy views (a 49,152-token vocabulary and its
    merges: ~10 s on a busy CPU) to give us five numbers, so this walks the key-value section itself
    (GGUF v2/v3: magic, version u32, tensor count u64, kv count u64, then per key: string key, u32 type,
    value; strings are u64 length + bytes, arrays u32 item type + u64 count + items), skipping what it does
    not need."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # a swapped version reads 0xXX000000
        offset = 24
        found: dict[str, Any] = {}

        def read(fmt: str) -> Any:
            nonlocal offset
            (value,) = struct.unpack_from(order + fmt, data, offset)
            offset += struct.calcsize(fmt)
            return value

        def read_bytes() -> bytes:
            nonlocal offset
            n = read("Q")
            offset += n
            return data[offset - n : offset]

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == _GGUF_STRING:
                return read_bytes()
            if kind == _GGUF_ARRAY:
                item_kind, count = read("I"), read("Q")
                if item_kind in _GGUF_SCALARS:
                    offset += count * struct.calcsize(_GGUF_SCALARS[item_kind])
                else:
                    for _ in range(count):
                        value(item_kind)
                return None
            return read(_GGUF_SCALARS[kind])

        try:
            for _ in range(struct.unpack_from(order + "Q", data, 16)[0]):
                key = read_bytes().decode("utf-8")
                item = value(read("I"))
                if key in keys and isinstance(item, (int, float)):  # bool is an int
                    found[key] = item
        except (struct.error, KeyError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read its GGUF metadata ({error}); the file may be damaged") from error
    return found
