"""What every family adapter shares: one table shape, one rename that applies it both ways, one protocol.

A family's mapping is a table: a list of entries, each naming one of our tensors and where Hugging Face keeps it.
  Rename(ours, theirs, transpose)  one HF tensor under another name. `transpose` for GPT-2's Conv1D, which
                                   computes y = x W + b with W stored (in, out), nn.Linear's (out, in) transposed.
  Fuse(ours, theirs, sizes)        ours is HF's tensors stacked by rows, W = [W_1; W_2; ...] (our fused qkv from
                                   q_proj, k_proj, v_proj); saving splits it back into parts of `sizes` rows.
  Tie(alias, source)               our `alias` is the same Parameter as our `source` (an output layer tied to
                                   the token embedding): filled from it on load, skipped on save.
  Copy(theirs, source)             HF's `theirs` holds our `source` again (a tied copy some checkpoints store):
                                   accepted and dropped on load, written on save.
Entries repeated per layer are written once, with `{i}` for the layer index, and expanded by `layers`.
`rename_from_hf` and `rename_to_hf` apply a table; `check_names` refuses tensors the table does not name and
names every one it lacks.

Each family (hf/gpt.py, hf/llama.py, hf/bert.py, hf/t5.py) provides the four conversions of `StateDictAdapter`
(torchtitan's shape, with the config passed in); hf/__init__.py registers them in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmforge.models.build import check_value_type
from lmforge.models.config import ModelConfig


@dataclass(frozen=True)
class Rename:
    """Our tensor `ours` is HF's `theirs` (transposed when `transpose`)."""

    ours: str
    theirs: str
    transpose: bool = False

    def at_layer(self, i: int) -> Rename:
        return Rename(self.ours.format(i=i), self.theirs.format(i=i), self.transpose)


@dataclass(frozen=True)
class Fuse:
    """Our tensor `ours` is HF's tensors `theirs` concatenated along dim 0, part k having sizes[k] rows
    (None: equal parts)."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None

    def at_layer(self, i: int) -> Fuse:
        return Fuse(self.ours.format(i=i), tuple(name.format(i=i) for name in self.theirs), self.sizes)


@dataclass(frozen=True)
class Tie:
    """Our tensor `alias` is the same Parameter as our `source`."""

    alias: str
    source: str


@dataclass(frozen=True)
class Copy:
    """HF's tensor `theirs` is a second copy of our `source` (as we store it)."""

    theirs: str
    source: str


Entry = Rename | Fuse | Tie | Copy


def params(
    ours: str,
    theirs: str | tuple[str, ...],
    *,
    bias: bool = True,
    transpose: bool = False,
    sizes: tuple[int, ...] | None = None,
) -> list[Rename | Fuse]:
    """The entries of one module: `ours.weight` from `theirs.weight`, and `.bias` likewise when `bias`.
    A tuple `theirs` names modules fused by rows (`sizes` as in Fuse); only a weight is ever transposed."""
    names = ["weight", "bias"] if bias else ["weight"]
    if isinstance(theirs, tuple):
        return [Fuse(f"{ours}.{p}", tuple(f"{module}.{p}" for module in theirs), sizes) for p in names]
    return [Rename(f"{ours}.{p}", f"{theirs}.{p}", transpose and p == "weight") for p in names]


def layers(n_layer: int, templates: list[Rename | Fuse]) -> list[Rename | Fuse]:
    """The templates once per layer with `{i}` filled in: layer 0's entries, then layer 1's, ..."""
    return [entry.at_layer(i) for i in range(n_layer) for entry in templates]


def check_names(given: set[str], expected: set[str], what: str = "state dict") -> None:
    """Refuse a state dict whose tensor names differ from the config's, naming every difference."""
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"{what} does not match the config: missing {missing}, unexpected {unexpected}")


def hf_names(entry: Rename | Fuse) -> tuple[str, ...]:
    return entry.theirs if isinstance(entry, Fuse) else (entry.theirs,)


def rename_from_hf(hf_state: dict[str, torch.Tensor], table: list[Entry]) -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors named exactly as the table's `theirs` (prefixes and buffers already
    removed by the family). A Rename is the HF tensor itself, or a transposed view of it: F.linear reads a
    view at full speed, and loading skips a pass over the weights."""
    copies = {entry.theirs for entry in table if isinstance(entry, Copy)}
    hf = {name: tensor for name, tensor in hf_state.items() if name not in copies}
    expected = {name for entry in table if isinstance(entry, (Rename, Fuse)) for name in hf_names(entry)}
    check_names(set(hf), expected, "Hugging Face state dict")
    state = {}
    for entry in table:
        if isinstance(entry, Rename):
            state[entry.ours] = hf[entry.theirs].t() if entry.transpose else hf[entry.theirs]
        elif isinstance(entry, Fuse):
            state[entry.ours] = torch.cat([hf[name] for name in entry.theirs])
    for entry in table:
        if isinstance(entry, Tie):
            state[entry.alias] = state[entry.source]
    return state


def rename_to_hf(state: dict[str, torch.Tensor], table: list[Entry]) -> dict[str, torch.Tensor]:
    """The HF tensors of our state dict, in table order, named exactly as the table's `theirs`. Split parts of a
    fused tensor are row views of it (contiguous, sharing its memory); a transposed weight is a contiguous copy."""
    aliases = {entry.alias for entry in table if isinstance(entry, Tie)}
    expected = {entry.ours for entry in table if isinstance(entry, (Rename, Fuse))}
    check_names(set(state) - aliases, expected)
    hf = {}
    for entry in table:
        if isinstance(entry, Rename):
            tensor = state[entry.ours]
            hf[entry.theirs] = tensor.t().contiguous() if entry.transpose else tensor
        elif isinstance(entry, Fuse):
            tensor = state[entry.ours]
            parts = tensor.split(entry.sizes) if entry.sizes else tensor.chunk(len(entry.theirs))
            hf.update(zip(entry.theirs, (part.contiguous() for part in parts), strict=True))
        elif isinstance(entry, Copy):
            hf[entry.theirs] = state[entry.source]
    return hf


NULL = type(None)
# The config.json keys the adapters read, with the JSON types Hugging Face writes for them. A value of another
# type (a null size, a string where a number goes) is refused by name before any adapter does arithmetic on it.
HF_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(
        (
            "vocab_size", "type_vocab_size", "max_position_embeddings", "n_positions", "n_ctx",
            "n_layer", "num_hidden_layers", "num_layers", "n_head", "num_attention_heads", "num_heads",
            "n_embd", "hidden_size", "d_model", "d_kv", "intermediate_size", "d_ff", "num_labels",
            "relative_attention_num_buckets", "relative_attention_max_distance", "decoder_start_token_id",
        ),
        (int,),
    ),
    **dict.fromkeys(
        ("n_inner", "num_key_value_heads", "head_dim", "num_decoder_layers", "sliding_window", "pad_token_id"),
        (int, NULL),
    ),
    **dict.fromkeys(
        (
            "layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "rope_theta", "resid_pdrop", "dropout_rate",
            "attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob",
        ),
        (float,),
    ),
    **dict.fromkeys(
        (
            "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx", "add_cross_attention",
        ),
        (bool,),
    ),
    **dict.fromkeys(
        ("model_type", "activation_function", "hidden_act", "feed_forward_proj", "position_embedding_type"), (str,)
    ),
    **dict.fromkeys(("rope_scaling", "rope_parameters", "id2label"), (dict, NULL)),
}  # fmt: skip


def check_hf_types(hf_config: dict[str, Any]) -> None:
    """Refuse a config.json value whose JSON type is not the one HF_CONFIG_TYPES gives its key, naming the key:
    "n_embd is null; expected an integer"."""
    for key, allowed in HF_CONFIG_TYPES.items():
        if key in hf_config:
            check_value_type(key, hf_config[key], allowed)


class StateDictAdapter(Protocol):
    """The four conversions between one family's configs and state dicts and Hugging Face's."""

    model_types: tuple[str, ...]  # the Hugging Face `model_type` values this adapter reads

    def config_from_hf(self, hf_config: dict[str, Any], head: str | None = None) -> ModelConfig:
        """Our config from a `config.json` dict; `head` overrides the one its `architectures` names."""
        ...

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """A `config.json` dict that `transformers` reads as the same model."""
        ...

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """Our state dict (tied aliases included) from the checkpoint's tensors; any mismatch is an error."""
        ...

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """The tensors `transformers`' model for the config names (tied copies included, where it stores them)."""
        ...
