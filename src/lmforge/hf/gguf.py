"""Llama and GPT-2 models from GGUF files (llama.cpp's single-file format), dequantised to float tensors.

A GGUF file holds typed key/value metadata (the architecture's sizes, the tokenizer) followed by tensors,
each stored as raw bytes of one GGML type at a recorded offset. `load_gguf` reads it with the `gguf`
package's `GGUFReader`, builds our config from the `<arch>.*` keys, dequantises every tensor to float32
and maps the names onto our model (`lmforge.hf.gguf_layouts`: one layout per architecture, llama and gpt2).
Quantised types store blocks of 32 consecutive weights of a row
(GGML's documented layouts, ggml/src/ggml-common.h):

    Q8_0  fp16 d, 32 x int8 q                          x_i = d q_i
    Q4_0  fp16 d, 16 bytes of 4-bit q                  x_i = d (q_i - 8)
    Q4_1  fp16 d, fp16 m, 16 bytes of 4-bit q          x_i = d q_i + m

In the 4-bit types byte j holds element j in its low nibble and element j + 16 in its high nibble.

Every count a GGUF file declares (metadata keys, string lengths, array lengths, tensors, dimensions, the
bytes of each tensor) is checked against the file's size by `check_gguf_layout`, a bounded walk over the
header, before the `gguf` reader sees the file: the reader trusts them, and a 96-byte file declaring an
array of 2^40 bytes would keep it looping for hours.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from lmforge.hf import ADAPTERS
from lmforge.hf.gguf_layouts import LAYOUTS, GGUFLayout
from lmforge.models.build import check_memory
from lmforge.models.config import ModelConfig

GGUF_MAGIC = b"GGUF"
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
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4
GGUF_ALIGNMENT = 32  # where tensor data starts, unless general.alignment says otherwise
# metadata value type id -> (name, struct format of one value; "" for strings and arrays)
GGUF_VALUE_TYPES = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
    5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 8: ("string", ""), 9: ("array", ""),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}  # fmt: skip
GGUF_STRING, GGUF_ARRAY = 8, 9
MIN_KEY_BYTES = 8 + 4 + 1  # name length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset


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


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` over `path`, with one-line errors for a missing, foreign, damaged or crafted file
    (every declared size is checked first: `check_gguf_layout`)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    check_gguf_layout(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct or numpy errors on bad bytes
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt, download it again"
        ) from exc


def check_gguf_layout(path: Path) -> None:
    """Walk a GGUF file's header (v2/v3, either byte order) and refuse it, naming the field, when a count it
    declares cannot fit in the file: the metadata key and tensor counts (each key takes >= 13 bytes, each
    tensor entry >= 24), every string and array length (an array of n values of b bytes needs n b bytes; of
    strings or arrays, >= 8 or 12 bytes each), the dimensions of each tensor (<= 4), and each tensor's bytes
    (elements / block size x block bytes of its GGML type), which must lie within the data section. Reads
    only the header, in one pass: ~0.1 s for a 49,152-token vocabulary and its merges."""
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path} is truncated: {size} bytes, fewer than a GGUF header's 24; download it again")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _GGUFLayout(path, data).check()


class _GGUFLayout:
    """The bounded walk of `check_gguf_layout`: `offset` moves through `data`, and nothing is read or stepped
    over before its length is checked against what is left."""

    def __init__(self, path: Path, data: mmap.mmap) -> None:
        self.path, self.data, self.offset = path, data, 0
        self.order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"  # swapped: 0xXX000000

    def fail(self, what: str) -> NoReturn:
        raise ValueError(f"{self.path}: {what}; the file is truncated, corrupt or crafted: download it again")

    def left(self) -> int:
        return len(self.data) - self.offset

    def read(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        if n > self.left():
            self.fail(f"{what} needs {n} bytes but only {self.left()} remain")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += n
        return value

    def string(self, what: str) -> bytes:
        n = self.read("Q", what)
        if n > self.left():
            self.fail(f"{what} declares a string of {n} bytes, but only {self.left()} bytes of the file remain")
        self.offset += n
        return self.data[self.offset - n : self.offset]

    def value(self, kind: int, what: str) -> Any:
        """Steps over one value of type `kind`; returns it unless it is an array (general.alignment is read)."""
        if kind not in GGUF_VALUE_TYPES:
            self.fail(f"{what} has unknown value type {kind}")
        if kind == GGUF_STRING:
            return self.string(what)
        if kind != GGUF_ARRAY:
            return self.read(GGUF_VALUE_TYPES[kind][1], what)
        item, count = self.read("I", what), self.read("Q", what)
        if item not in GGUF_VALUE_TYPES:
            self.fail(f"{what} is an array of unknown value type {item}")
        name, fmt = GGUF_VALUE_TYPES[item]
        least = struct.calcsize(fmt) if fmt else 8 if item == GGUF_STRING else 12  # a length; an item type + count
        if count * least > self.left():
            self.fail(
                f"{what} declares an array of {count} {name} values ({count * least} bytes at least), but only "
                f"{self.left()} bytes of the file remain"
            )
        if fmt:
            self.offset += count * least
        else:
            for _ in range(count):
                self.value(item, what)
        return None

    def check(self) -> None:
        from gguf import GGML_QUANT_SIZES  # GGML type id -> (weights per block, bytes per block), every type

        self.offset = 4
        version = self.read("I", "the version")
        if version not in GGUF_VERSIONS:
            self.fail(f"GGUF version {version} is not supported (lmforge reads versions {list(GGUF_VERSIONS)})")
        n_tensors, n_keys = self.read("Q", "the tensor count"), self.read("Q", "the metadata key count")
        for count, least, what in (
            (n_keys, MIN_KEY_BYTES, "metadata keys"),
            (n_tensors, MIN_TENSOR_INFO_BYTES, "tensors"),
        ):
            if count * least > self.left():
                room = self.left() // least
                self.fail(f"the header declares {count} {what}, but the {self.left()} bytes left hold at most {room}")
        alignment = GGUF_ALIGNMENT
        for i in range(n_keys):
            name = self.string(f"metadata key {i + 1} of {n_keys}'s name").decode("utf-8", errors="replace")
            value = self.value(self.read("I", f"metadata key {name!r}"), f"metadata key {name!r}")
            if name == "general.alignment":
                alignment = value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            self.fail(f"general.alignment={alignment!r} is not a power of two")
        tensors = [self.tensor_info(i, n_tensors, GGML_QUANT_SIZES) for i in range(n_tensors)]
        data_bytes = len(self.data) - -(-self.offset // alignment) * alignment  # data starts at the next multiple
        for name, shape, type_name, n_bytes, offset in tensors:
            if offset + n_bytes > data_bytes:
                self.fail(
                    f"tensor {name!r} of shape {shape} and type {type_name} needs {n_bytes} bytes at offset {offset}, "
                    f"but the file holds {max(data_bytes, 0)} bytes of tensor data"
                )

    def tensor_info(self, i: int, n_tensors: int, type_sizes: dict) -> tuple[str, tuple[int, ...], str, int, int]:
        """(name, shape in torch order, type name, bytes, offset in the data section) of the i-th tensor entry."""
        from gguf import GGMLQuantizationType

        name = self.string(f"tensor {i + 1} of {n_tensors}'s name").decode("utf-8", errors="replace")
        what = f"tensor {name!r}"
        n_dims = self.read("I", what)
        if n_dims > GGUF_MAX_DIMS:
            self.fail(f"{what} declares {n_dims} dimensions; GGUF tensors have at most {GGUF_MAX_DIMS}")
        dims = [self.read("Q", what) for _ in range(n_dims)]
        type_id, offset = self.read("I", what), self.read("Q", what)
        if type_id not in type_sizes:
            self.fail(f"{what} has unknown GGML type {type_id}")
        block_size, block_bytes = type_sizes[type_id]
        n_bytes = -(-math.prod(dims) // block_size) * block_bytes
        return name, tuple(reversed(dims)), GGMLQuantizationType(type_id).name, n_bytes, offset


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


def state_dict_from_gguf(reader, config: ModelConfig, layout: GGUFLayout) -> dict[str, torch.Tensor]:
    """Our state dict: dequantised tensors in HF's names and layout (the architecture's `GGUFLayout`), then the
    family's HF mapping."""
    for tensor in reader.tensors:
        ggml_type_name(int(tensor.tensor_type))  # refuse unsupported types before dequantising anything
    hf = {}
    for tensor in reader.tensors:
        name = layout.hf_name(tensor.name)
        hf[name] = layout.from_gguf(name, tensor_values(reader, tensor), config)
    return ADAPTERS[layout.family].state_dict_from_hf(hf, config)


def load_gguf(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A Llama or GPT (causal LM, eval mode) with the weights of a `llama` or `gpt2` GGUF file, dequantised
    to float32 (or `dtype`). Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1."""
    from lmforge.hf.load import build_from_state

    reader = open_gguf(path)
    meta = read_metadata(reader, skip=("tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    architecture = meta.get("general.architecture")
    if architecture not in LAYOUTS:
        raise ValueError(
            f"{path}: GGUF architecture {architecture!r} is not supported; lmforge loads {list(LAYOUTS)} GGUF files"
        )
    layout = LAYOUTS[architecture]
    try:
        config = layout.config_from_gguf(meta, shapes)
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(f"{path}: {error}") from None
    check_memory(config, dtype or torch.float32, source=f"{path}: ")  # dequantised: float32 unless cast
    model = build_from_state(config, state_dict_from_gguf(reader, config, layout), config, str(path))
    if dtype is not None:
        model.to(dtype)
    return model.eval()
