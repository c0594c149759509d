"""LoRA adapters in peft's folder format, so an adapter trained here loads onto the Hugging Face model and back.

A peft LoRA folder holds
    adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules (HF module names), ...
    adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight  (r, in)
                               base_model.model.<HF module>.lora_B.weight  (out, r)
                               base_model.model.<HF tensor>                 modules_to_save (the trained head)
peft applies y = W x + (lora_alpha / r) B A x to every module listed, and keeps lora_A / lora_B in
nn.Linear's (out, in) layout even for GPT-2's Conv1D, whose weight is stored transposed (fan_in_fan_out).

Names: our tensors and Hugging Face's correspond through the family's state-dict mapping in
`lmforge.hf.<family>`. Rather than restate it, `hf_tensor_parts` runs that mapping on a probe state dict
whose rows hold their own global index, and reads off where every row of ours lands (and which rows of a
fused tensor each HF tensor takes).

Fused projections: our `qkv` is one Linear where Llama and BERT have q, k and v apart (GPT-2's `c_attn` is
fused too). A rank-r update B A of the fused weight, with B's rows split into the blocks B_q, B_k, B_v, is
exactly the three updates B_q A, B_k A, B_v A: each projection gets the shared A and its row block of B.
The other way, an adapter trained by peft on q, k and v has its own A_q, A_k, A_v (r x d each); stacking
them, A = [A_q; A_k; A_v] (3r x d), and placing B = blockdiag(B_q, B_k, B_v) (out x 3r) gives
B A = [B_q A_q; B_k A_k; B_v A_v], exactly the three updates. The rank grows to 3r; the scale stays
lora_alpha / r. A projection the adapter leaves out gets zero rows of B.
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lmforge.finetune.lora import LoRALinear, freeze_all_but_adapters, linear_layers, lora_layers, replace_module
from lmforge.hf import ADAPTERS
from lmforge.hf.files import check_destination, read_pickled_state_dict, write_safetensors
from lmforge.io import atomic_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"  # what peft wrote before it defaulted to safetensors
PREFIX = "base_model.model."  # peft's prefix: PeftModel.base_model (LoraModel) .model (the HF model)
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "question_answering": "QUESTION_ANS",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
}

Part = tuple[str, int, int]  # (HF tensor name, first row, end row): rows [first, end) of one of our tensors


def hf_tensor_parts(model: nn.Module) -> dict[str, list[Part]]:
    """Our tensor name (as the model was before LoRA) -> the HF tensors made from it, with the row range
    each one takes. Found by running the family's `state_dict_to_hf` on a probe: every tensor replaced by
    a column of its rows' global indices (float64: exact up to 2^53), so the mapping's renames, splits and
    transposes can be read back from the values. Costs one number per row, not the weights."""
    config = getattr(model, "config", None)
    family = getattr(config, "family", None)
    if family not in ADAPTERS:
        raise ValueError(
            f"model family {family!r} has no Hugging Face mapping; peft adapters need one of {sorted(ADAPTERS)}"
        )
    wrapped = set(lora_layers(model))
    starts, names, probe = [], [], {}
    offset = 0
    for stored_name, tensor in model.state_dict().items():
        name = name_before_lora(stored_name, wrapped)
        if name is None:
            continue
        rows = torch.arange(offset, offset + tensor.shape[0], dtype=torch.float64)
        probe[name] = rows[:, None] if tensor.ndim >= 2 else rows
        starts.append(offset)
        names.append(name)
        offset += tensor.shape[0]
    parts: dict[str, list[Part]] = {}
    for hf_name, values in ADAPTERS[family].state_dict_to_hf(probe, config).items():
        ids = values.flatten()
        first = int(ids[0])
        index = bisect.bisect_right(starts, first) - 1
        start = first - starts[index]
        if not torch.equal(ids, torch.arange(first, first + ids.numel(), dtype=torch.float64)):
            raise ValueError(f"{hf_name} is not a row range of {names[index]}; LoRA cannot be mapped onto it")
        parts.setdefault(names[index], []).append((hf_name, start, start + ids.numel()))
    return parts


def name_before_lora(name: str, wrapped: set[str]) -> str | None:
    """ "x.qkv.base.weight" -> "x.qkv.weight" for a wrapped layer x.qkv; None for its lora_A / lora_B."""
    owner, _, child = name.rpartition(".")[0].rpartition(".")
    if owner not in wrapped:
        return name
    return f"{owner}.{name.rpartition('.')[2]}" if child == "base" else None


def save_adapter(
    model: nn.Module, folder: str | Path, *, base_model_name_or_path: str = "", overwrite: bool = False
) -> Path:
    """Write the model's LoRA adapters (and its trained head, as peft's modules_to_save) as a peft folder
    that `peft.PeftModel.from_pretrained(hf_model, folder)` loads onto the matching Hugging Face model.
    Written to a temporary folder and renamed into place. Returns the folder."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora(model, config) first")
    parts = hf_tensor_parts(model)
    # peft has one rank and one scale per file: pad smaller ranks with zeros and fold other scales into B.
    r = max(layer.r for layer in layers.values())
    scaling = next(iter(layers.values())).scaling
    tensors, adapted, heads = {}, set(), set()
    for name, layer in layers.items():
        if f"{name}.weight" not in parts:
            raise ValueError(f"LoRA layer {name!r} has no Hugging Face counterpart; adapt attention or MLP layers")
        A = F.pad(layer.lora_A.weight.detach(), (0, 0, 0, r - layer.r))  # (r, in)
        B = F.pad(layer.lora_B.weight.detach() * (layer.scaling / scaling), (0, r - layer.r))  # (out, r)
        for hf_name, start, end in parts[f"{name}.weight"]:
            module = hf_name.removesuffix(".weight")
            tensors[f"{PREFIX}{module}.lora_A.weight"] = A.clone()
            tensors[f"{PREFIX}{module}.lora_B.weight"] = B[start:end].clone()
            adapted.add(module)
    lora_names = {f"{name}.{ab}.weight" for name in layers for ab in ("lora_A", "lora_B")}
    for name, p in model.named_parameters():
        if p.requires_grad and name not in lora_names:
            if name not in parts:
                raise ValueError(f"trained parameter {name!r} has no Hugging Face counterpart; freeze it to save")
            for hf_name, start, end in parts[name]:
                tensors[PREFIX + hf_name] = p.detach()[start:end].clone()
                heads.add(hf_name.rsplit(".", 1)[0])
    universe = {
        hf.removesuffix(".weight") for name in linear_layers(model) for hf, _, _ in parts.get(f"{name}.weight", [])
    }
    first = next(iter(layers.values()))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(model.config.head),
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": r,
        "lora_alpha": scaling * r,
        "lora_dropout": first.drop.p,
        "target_modules": shortest_suffixes(adapted, universe),
        "modules_to_save": sorted(heads) or None,
        "bias": "none",
        "fan_in_fan_out": model.config.family == "gpt",  # GPT-2's Conv1D stores weights as (in, out)
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    check_destination(Path(folder), overwrite, marker=ADAPTER_CONFIG)
    with atomic_folder(folder) as tmp:
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(folder)


def shortest_suffixes(chosen: set[str], universe: set[str]) -> list[str]:
    """For each chosen HF module, its shortest dotted suffix that no other module of `universe` ends with
    (peft matches a target when the name is it or ends with "." + it): "c_attn", "attn.c_proj", "q_proj"."""
    others = universe - chosen
    found = set()
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                found.add(suffix)
                break
    return sorted(found)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a peft LoRA folder, checked for what `load_adapter` can apply."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder} is not a LoRA adapter folder: no {ADAPTER_CONFIG}; save one with save_adapter")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save the adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} describes a {kind!r} adapter, not a LoRA one (peft_type 'LORA')")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(
                f"{path} has {flag}=true, which lmforge's LoRA does not implement; use a plain LoRA adapter"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path} trains biases (bias={config['bias']!r}); lmforge loads adapters with bias 'none'")
    if not isinstance(config.get("lora_alpha"), (int, float)) or config["lora_alpha"] <= 0:
        raise ValueError(f"{path}: lora_alpha={config.get('lora_alpha')!r} must be a positive number")
    return config


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / ADAPTER_WEIGHTS).is_file():
        try:
            return load_file(str(folder / ADAPTER_WEIGHTS))
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{folder / ADAPTER_WEIGHTS} is not a valid safetensors file ({error}); re-save it"
            ) from None
    if (folder / ADAPTER_PICKLE).is_file():
        return read_pickled_state_dict(folder / ADAPTER_PICKLE)
    raise ValueError(f"{folder} has {ADAPTER_CONFIG} but no weights: expected {ADAPTER_WEIGHTS} or {ADAPTER_PICKLE}")


def module_alpha(config: dict, module: str) -> float:
    """lora_alpha for one HF module: peft's alpha_pattern (regex keys matched at the name's end) or the default."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return alpha
    return config["lora_alpha"]


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Apply a peft LoRA adapter folder (written by `save_adapter` or by peft) to our model, in place: wrap
    each adapted Linear in a `LoRALinear` holding the adapter's weights, load the saved head, freeze the
    rest (adapters and head stay trainable). Split HF projections onto one fused Linear share A when the
    adapter came from here, and are stacked exactly otherwise (see the module docstring).
    Returns the names of our wrapped Linear layers."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; load the adapter into a fresh model")
    where = {hf: (ours, start, end) for ours, found in hf_tensor_parts(model).items() for hf, start, end in found}
    linears = linear_layers(model)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{folder}: tensor {key!r} lacks peft's {PREFIX!r} prefix; this is not a peft adapter")
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            head[name] = tensor
        else:
            pairs.setdefault(name.removesuffix(suffix), {})[suffix[1:7]] = tensor
    if not pairs:
        raise ValueError(f"{folder} holds no lora_A / lora_B tensors; it is not a LoRA adapter")

    updates: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor, float]]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"} or f"{module}.weight" not in where:
            raise ValueError(
                f"{folder}: adapter module {module!r} has no complete A/B pair or no Linear layer in this "
                f"{model.config.family} model (head={model.config.head!r}); was it trained for another architecture?"
            )
        ours, start, end = where[f"{module}.weight"]
        layer = ours.removesuffix(".weight")
        A, B = ab["lora_A"], ab["lora_B"]
        if layer not in linears or A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{folder}: {module} lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a LoRA pair"
            )
        if A.shape[1] != linears[layer].in_features or B.shape[0] != end - start:
            raise ValueError(
                f"{folder}: {module} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; this model needs "
                f"(r, {linears[layer].in_features}) and ({end - start}, r): was it trained for another model size?"
            )
        r = A.shape[0]
        scale = module_alpha(config, module) / (r**0.5 if config.get("use_rslora") else r)
        updates.setdefault(layer, []).append((start, end, A, B, scale))

    dropout = config.get("lora_dropout", 0.0)
    for layer, found in updates.items():
        base = linears[layer]
        scaling = found[0][4]
        shared = all(torch.equal(A, found[0][2]) and s == scaling for _, _, A, _, s in found)
        A = found[0][2] if shared else torch.cat([A for _, _, A, _, _ in found])  # (rank, in)
        B = torch.zeros(base.out_features, A.shape[0], dtype=A.dtype)  # (out, rank)
        column = 0
        for start, end, _, B_part, s in found:
            B[start:end, column : column + B_part.shape[1]] = B_part * (s / scaling)
            column += 0 if shared else B_part.shape[1]
        adapter = LoRALinear(base, A.shape[0], scaling, dropout)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(A)
            adapter.lora_B.weight.copy_(B)
        replace_module(model, layer, adapter)

    freeze_all_but_adapters(model, [])
    for name, tensor in head.items():
        if name not in where:
            raise ValueError(f"{folder}: saved module tensor {name!r} has no counterpart in this model")
        ours, start, end = where[name]
        if ours.rsplit(".", 1)[0] in updates:
            raise ValueError(f"{folder}: {name!r} is both LoRA-adapted and saved in full; peft never writes that")
        param = model.get_parameter(ours)
        if tuple(tensor.shape) != (end - start, *param.shape[1:]):
            raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}")
        with torch.no_grad():
            param[start:end] = tensor
        param.requires_grad_(True)
    return [name for name in linears if name in updates]  # in the model's order
