"""`load_model`: a Hugging Face folder, an lmforge folder or a GGUF file -> an lmforge model.

The name given is resolved first (`lmforge.hf.resolve`: a run folder becomes its best checkpoint, a real
model's name its fetched files). The config is read and checked (value types, then `check_memory`: the
weights must fit in memory) before any model, even a weightless one, is built from it.

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

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.hf import ADAPTERS
from lmforge.hf.common import StateDictAdapter, check_hf_types
from lmforge.hf.files import CONFIG, CheckpointWeights, read_config
from lmforge.hf.resolve import resolve_model
from lmforge.models import FAMILIES, ModelConfig, config_from_dict
from lmforge.models.build import check_memory, check_types, meta_model, no_init

# Hugging Face model_type -> the adapter that reads it (mistral, qwen2 and qwen3 load as Llama)
HF_READERS: dict[str, StateDictAdapter] = {
    model_type: adapter for adapter in ADAPTERS.values() for model_type in adapter.model_types
}
HEAD_MODULES = ("lm_head.", "classifier.", "pooler.")  # tensors that belong to a head, not the backbone
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_model(
    path: str | Path, head: str | None = None, dtype: torch.dtype | str | None = None, **overrides: Any
) -> nn.Module:
    """A model from a checkpoint, in eval mode.

    path: a Hugging Face folder (config.json + model.safetensors, sharded safetensors or pytorch_model.bin;
        model_type gpt2, llama, mistral, qwen2, qwen3, bert, roberta or t5), an lmforge folder
        (written by `save_model`, or a training checkpoint), a run folder (its best checkpoint, see
        `lmforge.hf.resolve`), a `.gguf` file, or a real model's name ("SmolLM2-135M-Instruct").
    head: the task head; default: the one the checkpoint has (HF: from `architectures`). A different head
        keeps the backbone and starts the new head from fresh weights (a warning lists them).
    dtype: cast floating tensors (torch dtype or "float32", "bfloat16", ...); default: as stored.
    overrides: other config fields to change, e.g. num_labels=3, dropout=0.0, attention="reference".

    >>> model = load_model("checkpoints/minilm", head="sequence_classification", num_labels=3)
    """
    source = resolve_model(path, presets=False)
    if source.kind == "onnx":
        raise ValueError(
            f"{source.path} is an ONNX export, which onnxruntime runs (lmforge generate|evaluate|predict accept it); "
            "load the model it was exported from instead"
        )
    path = source.path
    dtype = resolve_dtype(dtype)
    if path.suffix == ".gguf":
        from lmforge.hf.gguf import load_gguf  # imported on use: only GGUF files need the gguf package

        stored_model = load_gguf(path, dtype=dtype)
        if head is None and not overrides:
            return stored_model
        stored = stored_model.config
        return build_from_state(stored, stored_model.state_dict(), target_config(stored, head, overrides), str(path))
    values = read_config(path)
    if values.get("format") == "lmforge" and "quantization" in values:  # int8 / int4 layers, loaded as saved
        from lmforge.hf.quantized import load_quantized

        if head is not None or dtype is not None or overrides:
            raise ValueError(f"{path} is a quantised checkpoint; it loads as saved (no head, dtype or overrides)")
        return load_quantized(values, path)
    weights = CheckpointWeights(path)
    stored = lmforge_config(values, path) if values.get("format") == "lmforge" else hf_config(values, path)
    headers = weights.headers()
    check_memory(stored, dtype or stored_dtype(headers), source=f"{path / CONFIG}: ")
    if values.get("format") == "lmforge":
        check_shapes(headers, meta_model(stored).state_dict(), weights.folder)
        state = weights.load(dtype)
    else:
        adapter = HF_READERS[values["model_type"]]
        expected = adapter.state_dict_to_hf(meta_model(stored).state_dict(), stored)
        check_shapes(headers, expected, weights.folder)
        state = adapter.state_dict_from_hf(weights.load(dtype), stored)
    return build_from_state(stored, state, target_config(stored, head, overrides), str(path))


def stored_dtype(headers: dict[str, tuple[tuple[int, ...], str]]) -> torch.dtype:
    """The floating dtype most of a checkpoint's tensors are stored in (float32 when none is)."""
    found = Counter(DTYPES[dtype] for _, dtype in headers.values() if dtype in DTYPES)
    return found.most_common(1)[0][0] if found else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


def hf_adapter(values: dict, folder: Path) -> StateDictAdapter:
    model_type = values.get("model_type")
    if model_type not in HF_READERS:
        raise ValueError(
            f"{folder / 'config.json'} has model_type={model_type!r}, which lmforge cannot load; supported: "
            f"{sorted(HF_READERS)} (Hugging Face) or an lmforge folder ('format': 'lmforge')"
        )
    return HF_READERS[model_type]


def hf_config(values: dict, folder: Path) -> ModelConfig:
    """Our config from a Hugging Face config.json dict; a missing key, a value of the wrong type (a null where
    a size goes) or one the config refuses is one error naming the file and the key."""
    adapter = hf_adapter(values, folder)
    file = folder / CONFIG
    try:
        check_hf_types(values)
        return adapter.config_from_hf(values)
    except KeyError as error:
        raise ValueError(
            f"{file} lacks {error}, which {values['model_type']} configs need; re-save the checkpoint"
        ) from None
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(f"{file}: {error}") from None


def lmforge_config(values: dict, folder: Path) -> ModelConfig:
    """Our config from an lmforge config.json dict (the model's config nested under "model"); errors name the
    file and the field, e.g. "model.d_model is null; expected an integer"."""
    file = folder / CONFIG
    if not isinstance(values.get("model"), dict):
        raise ValueError(f"{file} says format 'lmforge' but has no 'model' config object")
    try:
        return config_from_dict(values["model"], where="model.")
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ValueError(f"{file}: {error}") from None


def target_config(stored: ModelConfig, head: str | None, overrides: dict[str, Any]) -> ModelConfig:
    changes = dict(overrides)
    if head is not None:
        changes["head"] = head
    check_types(type(stored), changes)
    return stored.replace(**changes) if changes else stored


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
    """The target model holding `state` (our names, as the stored config's model has them). Overrides that
    grow the model past the memory left are refused before its skeleton is built (the stored config was
    checked when read)."""
    if target != stored:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        check_memory(target, dtype, source=f"{source}: ")
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
