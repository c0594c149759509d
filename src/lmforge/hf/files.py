"""Checkpoint folders on disk: reading `config.json` and weight files safely, writing folders atomically.

A folder holds `config.json` and its tensors in one of four layouts, tried in this order:
  model.safetensors                    one safetensors file
  model.safetensors.index.json         shards named by the index's "weight_map" {tensor: file}
  pytorch_model.bin                    a torch pickle, read only with torch.load(weights_only=True)
  pytorch_model.bin.index.json         shards of those
safetensors is a JSON header (name -> dtype, shape, byte offsets) followed by raw bytes, so names and
shapes are known without reading any tensor and nothing in it can execute. A pickle can run arbitrary
code when unpickled; `weights_only=True` restricts it to tensors and plain containers, and anything
else is refused rather than retried unsafely.

Writes go into a hidden temporary folder next to the destination and are renamed into place at the end
(`lmforge.io.atomic_folder`), so an interrupted save never leaves a folder that looks complete;
`check_destination` decides what an existing destination may be replaced by.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict; a clear error when it is absent or not a JSON object."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a checkpoint folder needs config.json next to its weights")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save the checkpoint") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(values).__name__}")
    return values


def _read_index(path: Path) -> dict[str, Path]:
    """tensor name -> shard path, from a Hugging Face `*.index.json`."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid shard index (needs a 'weight_map' object): {error}") from None
    shards = {name: path.parent / file for name, file in weight_map.items()}
    for shard in sorted(set(shards.values())):
        if not shard.is_file():
            raise FileNotFoundError(f"{shard} not found; {path.name} lists it as a shard of this checkpoint")
    return shards


class CheckpointWeights:
    """The tensors of a checkpoint folder. Names, shapes and dtypes come from safetensors headers without
    reading the data; `load()` reads everything (a pickle is read once, in full, on first use)."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        self.folder = folder
        self._pickled: dict[str, torch.Tensor] | None = None
        if (folder / SAFETENSORS).is_file():
            self.kind, self.files = "safetensors", [folder / SAFETENSORS]
        elif (folder / SAFETENSORS_INDEX).is_file():
            self.kind, self.files = "safetensors", sorted(set(_read_index(folder / SAFETENSORS_INDEX).values()))
        elif (folder / PICKLE).is_file():
            self.kind, self.files = "pickle", [folder / PICKLE]
        elif (folder / PICKLE_INDEX).is_file():
            self.kind, self.files = "pickle", sorted(set(_read_index(folder / PICKLE_INDEX).values()))
        else:
            raise FileNotFoundError(
                f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE} or {PICKLE_INDEX}"
            )

    def headers(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype name), in file order."""
        if self.kind == "pickle":
            return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in self._read_pickles().items()}
        found = {}
        for path in self.files:
            with _open_safetensors(path) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor_slice = f.get_slice(name)
                    found[name] = (tuple(tensor_slice.get_shape()), _safetensors_dtype(tensor_slice.get_dtype()))
        return found

    def load(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, floating ones cast to `dtype` when given."""
        if self.kind == "pickle":
            tensors = dict(self._read_pickles())
        else:
            tensors = {}
            for path in self.files:
                with _open_safetensors(path) as f:
                    try:
                        for name in f.keys():  # noqa: SIM118
                            tensors[name] = f.get_tensor(name)
                    except SafetensorError as error:
                        raise ValueError(f"{path} could not be read ({error}); re-download or re-save it") from None
        if dtype is not None:
            tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
        return tensors

    def _read_pickles(self) -> dict[str, torch.Tensor]:
        if self._pickled is None:
            self._pickled = {}
            for path in self.files:
                self._pickled.update(read_pickled_state_dict(path))
        return self._pickled


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def _safetensors_dtype(code: str) -> str:
    return SAFETENSORS_DTYPES.get(code, code.lower())


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator:
    """safe_open with the library's errors (bad header, truncated data) turned into one naming the file."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); it is truncated or corrupt: re-download or re-save it"
        ) from None
    with handle as f:
        yield f


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` state dict, read with torch.load(weights_only=True) and nothing else."""
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others depending on the damage
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only load failed" in reason.lower() or "unsupported global" in str(error).lower():
            raise ValueError(
                f"{path} holds Python objects other than tensors, and lmforge reads .bin files only with "
                f"torch.load(weights_only=True) because unpickling anything else can run arbitrary code; "
                f"convert it to safetensors in an environment you trust"
            ) from None
        raise ValueError(
            f"{path} could not be read as a PyTorch state dict ({reason}); re-download or re-save it"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}, not a state dict of named tensors")
    others = sorted(str(name) for name, value in values.items() if not isinstance(value, torch.Tensor))
    if others:
        raise ValueError(f"{path} holds entries that are not tensors: {others}; expected a state dict")
    return values


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save with the metadata Hugging Face loaders require ({"format": "pt"}). Tensors must not share
    memory (safetensors refuses aliases): callers drop tied copies first."""
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(path), metadata={"format": "pt"})


def check_destination(path: Path, overwrite: bool = False, marker: str = CONFIG) -> None:
    """Refuse to write a checkpoint folder over `path` unless that is safe: `path` may be absent or empty;
    an existing non-empty `path` is replaced only with overwrite=True, and only if it is itself a checkpoint
    (has the file `marker`, config.json by default), so a typo cannot delete an unrelated folder. Write the
    folder itself with `lmforge.io.atomic_folder`.

    A symbolic link is refused whatever it points at: replacing it would drop the link (the folder swap renames
    entries, it does not follow them) and writing into its target would delete a folder the command never named."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link to {path.resolve()}; lmforge does not write through links: "
            f"give the target folder itself as the destination, or remove the link"
        )
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} exists and is not a folder; choose another destination")
        if any(path.iterdir()):
            if not overwrite:
                raise ValueError(f"{path} exists and is not empty; choose a new folder or overwrite it (--overwrite)")
            if not (path / marker).is_file():
                raise ValueError(f"{path} is not a checkpoint folder (no {marker}); refusing to replace it")
