"""`load_model`: a Hugging Face folder, an lmforge folder or a GGUF file -> an lmforge model.

Every source ends the same way: a stored config (what the checkpoint holds), a state dict in our names,
and the target config (the stored one with `head` and any overrides applied). `build_from_state` then
checks the tensors against the target model, builds it without spending time on random initialisation,
and assigns the loaded tensors in place (`load_state_dict(assign=True)`: no copy into fresh parameters).

Changing the head (e.g. a masked-LM checkpoint loaded for sequence classification) keeps the backbone,
initialises the new head's tensors the model's usual way and drops the old head's; both lists are
reported in a warning. Everything else must match exactly: one error names each missing, unexpected or
wrongly-shaped tensor.

Tied weights (an output layer that is the token embedding) are one Parameter under two names; a file
stores it once (or twice, for some HF checkpoints), and loading ties the two names back to one object.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lmforge.hf import bert as hf_bert
from lmforge.hf import gpt as hf_gpt
from lmforge.hf import llama as hf_llama
from lmforge.hf import t5 as hf_t5
from lmforge.hf.files import CheckpointWeights, read_config
from lmforge.models import FAMILIES, ModelConfig, config_from_dict

# Hugging Face model_type -> the mapping module that reads it; lmforge family -> the one that writes it.
HF_MAPPINGS: dict[str, ModuleType] = {
    "gpt2": hf_gpt,
    "llama": hf_llama,
    "mistral": hf_llama,
    "qwen2": hf_llama,
    "qwen3": hf_llama,
    "bert": hf_bert,
    "roberta": hf_bert,
    "t5": hf_t5,
}
FAMILY_MAPPINGS: dict[str, ModuleType] = {
    "gpt": hf_gpt,
    "llama": hf_llama,
    "bert": hf_bert,
    "roberta": hf_bert,
    "t5": hf_t5,
}
HEAD_MODULES = ("lm_head.", "classifier.", "pooler.")  # tensors that belong to a head, not the backbone
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_model(
    path: str | Path, head: str | None = None, dtype: torch.dtype | str | None = None, **overrides: Any
) -> nn.Module:
    """A model from a checkpoint, in eval mode.

    path: a Hugging Face folder (config.json + model.safetensors, sharded safetensors or pytorch_model.bin;
        model_type gpt2, llama, mistral, qwen2, qwen3, bert, roberta or t5), an lmforge folder
        (written by `save_model`), or a `.gguf` file.
    head: the task head; default: the one the checkpoint has (HF: from `architectures`). A different head
        keeps the backbone and starts the new head from fresh weights (a warning lists them).
    dtype: cast floating tensors (torch dtype or "float32", "bfloat16", ...); default: as stored.
    overrides: other config fields to change, e.g. num_labels=3, dropout=0.0, attention="reference".

    >>> model = load_model("checkpoints/minilm", head="sequence_classification", num_labels=3)
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    if path.suffix == ".gguf":
        stored_model = _load_gguf(path, dtype)
        if head is None and not overrides:
            return stored_model
        stored = stored_model.config
        return build_from_state(stored, stored_model.state_dict(), target_config(stored, head, overrides), str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; expected a checkpoint folder or a .gguf file")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; load_model reads a checkpoint folder (config.json + weights) or a .gguf")
    values = read_config(path)
    weights = CheckpointWeights(path)
    if values.get("format") == "lmforge":
        stored = lmforge_config(values, path)
        check_shapes(weights.headers(), meta_model(stored).state_dict(), weights.folder)
        state = weights.load(dtype)
    else:
        stored = hf_config(values, path)
        mapping = HF_MAPPINGS[values["model_type"]]
        expected = mapping.state_dict_to_hf(meta_model(stored).state_dict(), stored)
        check_shapes(weights.headers(), expected, weights.folder)
        state = mapping.state_dict_from_hf(weights.load(dtype), stored)
    return build_from_state(stored, state, target_config(stored, head, overrides), str(path))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def hf_mapping(values: dict, folder: Path) -> ModuleType:
    model_type = values.get("model_type")
    if model_type not in HF_MAPPINGS:
        raise ValueError(
            f"{folder / 'config.json'} has model_type={model_type!r}, which lmforge cannot load; supported: "
            f"{sorted(HF_MAPPINGS)} (Hugging Face) or an lmforge folder ('format': 'lmforge')"
        )
    return HF_MAPPINGS[model_type]


def hf_config(values: dict, folder: Path) -> ModelConfig:
    """Our config from a Hugging Face config.json dict (a missing required key is named)."""
    try:
        return hf_mapping(values, folder).config_from_hf(values)
    except KeyError as error:
        raise ValueError(
            f"{folder / 'config.json'} lacks {error}, which {values['model_type']} configs need; re-save the checkpoint"
        ) from None


def lmforge_config(values: dict, folder: Path) -> ModelConfig:
    if not isinstance(values.get("model"), dict):
        raise ValueError(f"{folder / 'config.json'} says format 'lmforge' but has no 'model' config object")
    return config_from_dict(values["model"])


def target_config(stored: ModelConfig, head: str | None, overrides: dict[str, Any]) -> ModelConfig:
    changes = dict(overrides)
    if head is not None:
        changes["head"] = head
    return stored.replace(**changes) if changes else stored


def _load_gguf(path: Path, dtype: torch.dtype | None) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a .gguf file")
    from lmforge.hf.gguf import load_gguf  # imported on use: only GGUF files need the gguf package

    return load_gguf(path, dtype=dtype)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Makes torch.nn.init's initialisers no-ops, so building a model only allocates its tensors.

    Loading replaces every tensor anyway; drawing ~10^8 random numbers first would cost more than reading
    them from disk. Allocation is free until memory is touched, and assigned tensors replace these untouched.
    (It patches module attributes, so another thread building a model meanwhile would skip its init too.)
    """
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def meta_model(config: ModelConfig) -> nn.Module:
    """The model with shapes only (meta tensors): for checking names and shapes without memory."""
    with torch.device("meta"), no_init():
        return FAMILIES[config.family][1](config)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """alias name -> first name of the same Parameter (e.g. lm_head.weight -> tok_emb.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def check_shapes(found: dict[str, tuple], expected: dict[str, torch.Tensor], source: Path) -> None:
    """Tensors present in both with different shapes -> one error naming each (names are checked later)."""
    wrong = [
        f"{name}: expected {tuple(expected[name].shape)}, found {shape}"
        for name, (shape, _) in found.items()
        if name in expected and tuple(expected[name].shape) != tuple(shape)
    ]
    if wrong:
        raise ValueError(f"{source}: tensors with the wrong shape for its config: {'; '.join(wrong)}")


def build_from_state(
    stored: ModelConfig, state: dict[str, torch.Tensor], target: ModelConfig, source: str
) -> nn.Module:
    """The target model holding `state` (our names, as the stored config's model has them)."""
    skeleton = meta_model(target)
    aliases = tied_aliases(skeleton)
    stored_aliases = tied_aliases(meta_model(stored)) if stored != target else aliases
    state = {n: t for n, t in state.items() if n not in stored_aliases}
    expected = {n: tuple(t.shape) for n, t in skeleton.state_dict().items() if n not in aliases}

    new = sorted(set(expected) - set(state))
    dropped = sorted(set(state) - set(expected))
    if stored.head != target.head:  # the head may change; the backbone may not
        head_new = [n for n in new if n.startswith(HEAD_MODULES)]
        head_dropped = [n for n in dropped if n.startswith(HEAD_MODULES)]
        missing, unexpected = sorted(set(new) - set(head_new)), sorted(set(dropped) - set(head_dropped))
        new, dropped = head_new, head_dropped
    else:
        missing, unexpected, new, dropped = new, dropped, [], []
    wrong = [
        f"{n}: expected {expected[n]}, found {tuple(state[n].shape)}"
        for n in sorted(set(expected) & set(state))
        if tuple(state[n].shape) != expected[n]
    ]
    if missing or unexpected or wrong:
        problems = [
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
            f"wrong shape: {'; '.join(wrong)}" if wrong else "",
        ]
        raise ValueError(
            f"{source}: tensors do not match {target.family} head={target.head!r}: "
            + ", ".join(p for p in problems if p)
        )

    model_class = FAMILIES[target.family][1]
    if new:
        model = model_class(target)  # the new head needs the model's own initialisation
    else:
        with no_init():
            model = model_class(target)
    model.load_state_dict({n: state[n] for n in expected if n in state}, strict=False, assign=True)
    for alias, primary in aliases.items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(primary))
    if new or dropped:
        warnings.warn(
            f"{source}: loaded with head={target.head!r} instead of the checkpoint's {stored.head!r}; "
            f"newly initialised (train them before use): {new}; dropped from the checkpoint: {dropped}",
            stacklevel=3,
        )
    return model.eval()
