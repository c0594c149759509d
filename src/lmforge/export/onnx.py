"""ONNX export: every lmforge family and head as ONNX graphs that onnxruntime runs, through `torch.onnx.export`'s
dynamo exporter (`torch.export` traces the model, onnxscript translates each ATen op; Optimum's export is the
peer this follows for the graph layout and the names).

What a folder holds (`export_onnx`):

    onnx.json        the manifest: format, family, head, graph kind, each graph's file, inputs and outputs with
                     their axes, the KV-cache layout, the opset, the largest |ONNX - eager| seen at export
    model.onnx       encoders and decoder-only models; encoder-decoders have encoder.onnx and decoder.onnx
    config.json      the model's config (lmforge's format), so the folder says what it was exported from
    tokenizer files, task.json (a fine-tuned model's task and labels), generation_config.json: copied

The graphs, one `GraphSet` per kind of family (`GRAPH_SETS`):

    encoder  (bert, roberta; every head)   input_ids, attention_mask, token_type_ids (B, T) -> logits
             (or last_hidden_state for head "none")
    decoder  (gpt, llama)  causal_lm: input_ids (B, T), attention_mask (B, P + T),
                           past_key_values.{i}.key / .value (B, H_kv, P, d_head) for every layer i
                           -> logits (B, T, V), present.{i}.key / .value (B, H_kv, P + T, d_head)
             other heads:  input_ids, attention_mask (B, T) -> logits (or last_hidden_state)
    seq2seq  (t5, transformer; seq2seq_lm)  encoder.onnx: input_ids, attention_mask (B, S) -> encoder_hidden_states;
             decoder.onnx: decoder_input_ids (B, T), decoder_attention_mask (B, P + T), encoder_hidden_states
             (B, S, d), encoder_attention_mask (B, S), past self-attention keys/values -> logits, presents

A decoding step is one run: the presents of one step are the past of the next, so the prompt is run once with
P = 0 and every later step feeds one token (`lmforge.export.onnx_runtime` does this inside lmforge's own
decoding loop). The cross-attention keys/values of encoder-decoders are recomputed from encoder_hidden_states
at each step (a (B, S, d) x (d, 2d) product per layer), which keeps the decoder one graph.

Every axis but the feature ones is dynamic (batch, sequence, past, source); the example the exporter traces
uses distinct sizes of at least 2 (batch 2, sequence 3, source 4, past 5), since `torch.export` specialises a
size of 0 or 1 and would merge two axes that happen to have the same size. The mask always reaches the graph,
so the models take their masked path whatever the sizes. `--quantize int8` runs onnxruntime's dynamic
quantisation (`quantize_dynamic`: int8 weights per tensor, activations quantised on the fly per batch) on the
exported graphs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.hf.resolve import ONNX_MANIFEST
from lmforge.io import atomic_folder, write_json_atomic
from lmforge.nn.attention import Attention, KVCache, reference_attention

OPSET = 23
"""ONNX opset 23 has an `Attention` operator: the exporter translates `F.scaled_dot_product_attention` to it,
and onnxruntime (>= 1.23) runs it as one kernel, where opset 18 spells attention out as MatMul, Mul, Add,
Softmax and MatMul nodes. On the MiniLM classifier of `benchmarks/bench_export.py` that is what lets
onnxruntime's graph optimiser fuse the rest of the block (SkipLayerNormalization with its bias, BiasGelu)."""
WRITTEN_OUT_FAMILIES = ("t5",)
"""Families whose attention is traced as the formula written out (`written_out_attention`), not as SDPA."""
QUANTIZATIONS = ("int8",)
EXAMPLE_SIZES = {"batch": 2, "sequence": 3, "source_sequence": 4, "past_sequence": 5}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
COPIED_FILES = ("task.json", "generation_config.json")


@dataclass
class Graph:
    """One ONNX graph to export: the module `torch.export` traces (flat tensor arguments), its example arguments,
    and for each input and output its name and the names of its dynamic axes (position -> name)."""

    name: str
    module: nn.Module
    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]
    example: tuple[torch.Tensor, ...] = field(default=())

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


# ------------------------------------------------------------------------------------------ traced wrappers


def cache_layout(model: nn.Module) -> tuple[int, int, int]:
    """(cached layers, key/value heads, features per head) of a decoder's self-attention KV cache."""
    attention = next(m for m in model.modules() if isinstance(m, Attention) and not m.cross)
    layers = getattr(model.config, "decoder_layers", model.config.n_layer)
    return layers, attention.n_kv_heads, attention.head_dim


def cache_from(past: tuple[torch.Tensor, ...]) -> KVCache:
    """A KVCache holding the flat (key_0, value_0, key_1, value_1, ...) tensors of the graph's inputs."""
    cache = KVCache()
    for i in range(0, len(past), 2):
        cache.self_kv[i // 2] = (past[i], past[i + 1])
    return cache


def presents(cache: KVCache, layers: int) -> list[torch.Tensor]:
    return [t for i in range(layers) for t in cache.self_kv[i]]


def output_of(model: nn.Module, out) -> torch.Tensor:
    """The head's logits, or the final hidden states of a head-less model."""
    return out.logits if model.config.head != "none" else out.last_hidden_state


class EncoderModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        return output_of(self.model, self.model(input_ids, attention_mask, token_type_ids))


class PlainDecoderModule(nn.Module):
    """A decoder-only model without its cache (classification, tagging, question answering heads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return output_of(self.model, self.model(input_ids, attention_mask=attention_mask))


class CachedDecoderModule(nn.Module):
    """A causal LM step: new tokens and the past keys/values in, logits and the presents out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, cache_layout(model)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = cache_from(past)
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        return (out.logits, *presents(cache, self.layers))


class Seq2SeqEncoderModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model.encode(input_ids, attention_mask)


class Seq2SeqDecoderModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.layers = model, cache_layout(model)[0]

    def forward(
        self,
        decoder_input_ids: torch.Tensor,
        decoder_attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        *past: torch.Tensor,
    ):
        cache = cache_from(past)
        out = self.model(
            attention_mask=encoder_attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_hidden_states,
            past_key_values=cache,
            use_cache=True,
        )
        return (out.logits, *presents(cache, self.layers))


# ------------------------------------------------------------------------------------------ graph sets


def past_names(layers: int, prefix: str) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, ... (prefix "present": the outputs)."""
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def example_ids(vocab_size: int, rows: int, columns: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (rows, columns), generator=torch.Generator().manual_seed(0))


def example_mask(rows: int, columns: int) -> torch.Tensor:
    mask = torch.ones(rows, columns, dtype=torch.long)
    mask[0, 0] = 0  # a padded row: the trace sees padding (the graph is the same either way)
    return mask


def example_past(model: nn.Module, batch: int, past: int) -> tuple[torch.Tensor, ...]:
    layers, heads, head_dim = cache_layout(model)
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(batch, heads, past, head_dim, generator=generator) for _ in range(2 * layers))


def cache_axes(layers: int, prefix: str, length: str) -> dict[str, dict[int, str]]:
    return {name: {0: "batch", 2: length} for name in past_names(layers, prefix)}


def encoder_graphs(model: nn.Module) -> list[Graph]:
    B, T = EXAMPLE_SIZES["batch"], EXAMPLE_SIZES["sequence"]
    axes = {0: "batch", 1: "sequence"}
    output = "logits" if model.config.head != "none" else "last_hidden_state"
    output_axes = {0: "batch"} if model.config.head == "sequence_classification" else axes
    example = (example_ids(model.config.vocab_size, B, T), example_mask(B, T), torch.zeros(B, T, dtype=torch.long))
    inputs = {"input_ids": axes, "attention_mask": axes, "token_type_ids": axes}
    return [Graph("model", EncoderModule(model), inputs, {output: output_axes}, example)]


def decoder_graphs(model: nn.Module) -> list[Graph]:
    c = model.config
    B, T, P = EXAMPLE_SIZES["batch"], EXAMPLE_SIZES["sequence"], EXAMPLE_SIZES["past_sequence"]
    axes = {0: "batch", 1: "sequence"}
    if c.head != "causal_lm":
        output = "logits" if c.head != "none" else "last_hidden_state"
        output_axes = {0: "batch"} if c.head == "sequence_classification" else axes
        example = (example_ids(c.vocab_size, B, T), example_mask(B, T))
        inputs = {"input_ids": axes, "attention_mask": axes}
        return [Graph("model", PlainDecoderModule(model), inputs, {output: output_axes}, example)]
    layers = cache_layout(model)[0]
    inputs = {
        "input_ids": axes,
        "attention_mask": {0: "batch", 1: "total_sequence"},
        **cache_axes(layers, "past_key_values", "past_sequence"),
    }
    outputs = {"logits": axes, **cache_axes(layers, "present", "total_sequence")}
    example = (example_ids(c.vocab_size, B, T), example_mask(B, P + T), *example_past(model, B, P))
    return [Graph("model", CachedDecoderModule(model), inputs, outputs, example)]


def seq2seq_graphs(model: nn.Module) -> list[Graph]:
    c = model.config
    B, T, S, P = (EXAMPLE_SIZES[k] for k in ("batch", "sequence", "source_sequence", "past_sequence"))
    source = {0: "batch", 1: "source_sequence"}
    encoder = Graph(
        "encoder",
        Seq2SeqEncoderModule(model),
        {"input_ids": source, "attention_mask": source},
        {"encoder_hidden_states": source},
        (example_ids(c.vocab_size, B, S), example_mask(B, S)),
    )
    layers = cache_layout(model)[0]
    target_vocab = getattr(c, "target_vocab_size", c.vocab_size)
    hidden = torch.randn(B, S, c.d_model, generator=torch.Generator().manual_seed(2))
    decoder = Graph(
        "decoder",
        Seq2SeqDecoderModule(model),
        {
            "decoder_input_ids": {0: "batch", 1: "sequence"},
            "decoder_attention_mask": {0: "batch", 1: "total_sequence"},
            "encoder_hidden_states": source,
            "encoder_attention_mask": source,
            **cache_axes(layers, "past_key_values", "past_sequence"),
        },
        {"logits": {0: "batch", 1: "sequence"}, **cache_axes(layers, "present", "total_sequence")},
        (
            example_ids(target_vocab, B, T),
            torch.ones(B, P + T, dtype=torch.long),
            hidden,
            example_mask(B, S),
            *example_past(model, B, P),
        ),
    )
    return [encoder, decoder]


@dataclass(frozen=True)
class GraphSet:
    """The graphs of one kind of family: which families and heads it exports, and how."""

    kind: str
    families: tuple[str, ...]
    heads: tuple[str, ...]
    graphs: Callable[[nn.Module], list[Graph]]


ENCODER_HEADS = ("none", "masked_lm", "sequence_classification", "token_classification", "question_answering")
DECODER_HEADS = ("none", "causal_lm", "sequence_classification", "token_classification", "question_answering")
GRAPH_SETS = {
    graph_set.kind: graph_set
    for graph_set in (
        GraphSet("encoder", ("bert", "roberta"), ENCODER_HEADS, encoder_graphs),
        GraphSet("decoder", ("gpt", "llama"), DECODER_HEADS, decoder_graphs),
        GraphSet("seq2seq", ("t5", "transformer"), ("seq2seq_lm",), seq2seq_graphs),
    )
}


def graph_set_for(family: str, head: str) -> GraphSet:
    """The GraphSet that exports `family` with `head`; a ValueError names what is supported otherwise."""
    for graph_set in GRAPH_SETS.values():
        if family in graph_set.families:
            if head not in graph_set.heads:
                raise ValueError(
                    f"ONNX export of a {family} model supports the heads {', '.join(graph_set.heads)}; "
                    f"this one has head {head!r}"
                )
            return graph_set
    families = ", ".join(f for s in GRAPH_SETS.values() for f in s.families)
    raise ValueError(f"family {family!r} cannot be exported to ONNX; supported families: {families}")


# ------------------------------------------------------------------------------------------ export


@contextlib.contextmanager
def written_out_attention(model: nn.Module) -> Iterator[None]:
    """For the families in `WRITTEN_OUT_FAMILIES`, trace attention as the formula written out
    (`reference_attention`: softmax(Q K^T s + M) V) rather than through `F.scaled_dot_product_attention`, and
    restore it after; other families are left as they are.

    Why: T5's attention (scale 1, its position bias as the additive mask) does not export through SDPA: the
    exporter decomposes the traced op, whose fused CPU kernel lays its output out (B, T, H, d) in memory while
    the decomposed op returns (B, H, T, d), so the reshape the trace recorded as a view of the transposed
    output fails ("Failed to decompose the FX graph"; pytorch/pytorch#136543, #141107). Written out, it
    exports as MatMul, Softmax, MatMul: the same arithmetic, without the fused `Attention` node that every
    other family gets (`OPSET`). The eager model is left as it is.
    """
    if model.config.family not in WRITTEN_OUT_FAMILIES:
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.attend for m in modules]
    try:
        for m in modules:
            m.attend = reference_attention
        yield
    finally:
        for m, attend in zip(modules, saved, strict=True):
            m.attend = attend


def dynamic_shapes(graph: Graph) -> tuple:
    """`torch.export` dynamic shapes of the graph's inputs: a named Dim per axis name, so that axes that share a
    name share a size. total_sequence (past + new positions) is left to the exporter (`Dim.AUTO`), which
    derives it from the other two. Lengths are bounded by the model's max_seq_len where it has one (models check
    positions against it, and the exporter keeps that check as the axis' range)."""
    from torch.export import Dim

    limit = getattr(graph.module.model.config, "max_seq_len", None)
    dims = {name: Dim(name) if name == "batch" else Dim(name, max=limit) for name in EXAMPLE_SIZES}
    dims["total_sequence"] = Dim.AUTO
    shapes = [{axis: dims[name] for axis, name in axes.items()} for axes in graph.inputs.values()]
    parameters = inspect.signature(graph.module.forward).parameters.values()
    fixed = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if fixed == len(parameters):
        return tuple(shapes)
    return (*shapes[:fixed], tuple(shapes[fixed:]))  # torch.export groups the *past arguments into one tuple


def export_graph(graph: Graph, path: Path) -> float:
    """Export `graph` to the ONNX file `path`; returns max |onnxruntime - eager| over its outputs at the example."""
    import onnxruntime

    graph.module.eval()
    with torch.no_grad():
        expected = graph.module(*graph.example)
    program = torch.onnx.export(
        graph.module,
        graph.example,
        dynamo=True,
        dynamic_shapes=dynamic_shapes(graph),
        input_names=list(graph.inputs),
        output_names=list(graph.outputs),
        opset_version=OPSET,
        verbose=False,
    )
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(graph.inputs, graph.example, strict=True)}
    got = session.run(list(graph.outputs), feeds)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))


def quantize_graph(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantisation: weights to int8 once, activations per batch at run time.

    Every op type its registry quantises but "Attention": the quantiser takes ONNX's own Attention (opset 23,
    no weights) for onnxruntime's com.microsoft Attention (which holds the QKV projection) and rewrites it into
    a QAttention that fails to load ("Unrecognized attribute: is_causal"). Attention's inputs are activations,
    so leaving it in float loses no int8 weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    ops = [op for op in IntegerOpsRegistry if op != "Attention"]
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=ops)


def manifest(model: nn.Module, graph_set: GraphSet, graphs: list[Graph], errors: dict[str, float], quantize) -> dict:
    from lmforge import __version__

    layers, heads, head_dim = cache_layout(model) if graph_set.kind != "encoder" else (0, 0, 0)
    cached = graph_set.kind == "seq2seq" or model.config.head == "causal_lm"
    return {
        "format": "onnx",
        "lmforge_version": __version__,
        "family": model.config.family,
        "head": model.config.head,
        "kind": graph_set.kind,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": OPSET,
        "quantization": quantize,
        "cache": {"layers": layers, "kv_heads": heads, "head_dim": head_dim} if cached else None,
        "graphs": {
            g.name: {
                "file": g.file,
                "inputs": {name: {str(k): v for k, v in axes.items()} for name, axes in g.inputs.items()},
                "outputs": {name: {str(k): v for k, v in axes.items()} for name, axes in g.outputs.items()},
                "max_abs_diff_at_export": errors[g.name],
            }
            for g in graphs
        },
    }


def export_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    source: str | Path | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export `model` (any lmforge model; run in fp32 on the CPU) to the folder `out` (see the module docstring);
    `source`, the folder or .gguf it was loaded from, gives the tokenizer and task files to copy. The folder
    appears complete or not at all (`lmforge.io.atomic_folder`). Returns `out`.

    >>> export_onnx(load_model("runs/minilm/model"), "minilm-onnx", source="runs/minilm/model", quantize="int8")
    """
    from lmforge.hf.files import check_destination

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; choose one of {QUANTIZATIONS} or none")
    config = model.config
    graph_set = graph_set_for(config.family, config.head)
    out = Path(out)
    check_destination(out, overwrite, marker=ONNX_MANIFEST)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    graphs = graph_set.graphs(model)
    with (
        atomic_folder(out) as tmp,
        tempfile.TemporaryDirectory(prefix="lmforge-onnx-") as work,
        written_out_attention(model),
    ):
        errors = {}
        for graph in graphs:
            exported = Path(work) / graph.file if quantize else tmp / graph.file
            errors[graph.name] = export_graph(graph, exported)
            if quantize:
                quantize_graph(exported, tmp / graph.file)
        write_json_atomic(tmp / ONNX_MANIFEST, manifest(model, graph_set, graphs, errors, quantize))
        write_json_atomic(tmp / "config.json", {"format": "lmforge", "model": config.to_dict()})
        if source is not None:
            copy_companions(Path(source), tmp)
    return out


def copy_companions(source: Path, folder: Path) -> None:
    """The tokenizer (files, or the vocabulary of a .gguf), task.json and generation_config.json of `source`."""
    if source.suffix == ".gguf":
        from lmforge.data.tokenizers.tokenizer import load_tokenizer
        from lmforge.hf.save import save_tokenizer

        save_tokenizer(load_tokenizer(source), folder)
        return
    for name in (*TOKENIZER_FILES, *COPIED_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an exported folder; a FileNotFoundError or ValueError names what is wrong."""
    path = Path(folder) / ONNX_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an ONNX export (no {ONNX_MANIFEST}); make one with lmforge export")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); export the model again") from None
    if not isinstance(values, dict) or values.get("format") != "onnx" or values.get("kind") not in GRAPH_SETS:
        raise ValueError(f"{path} is not an lmforge ONNX manifest; export the model again")
    missing = [g["file"] for g in values["graphs"].values() if not (Path(folder) / g["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; export the model again")
    return values


def report(out: Path, values: dict[str, Any]) -> str:
    """One line about an export, for the command to print."""
    files = ", ".join(g["file"] for g in values["graphs"].values())
    worst = max(g["max_abs_diff_at_export"] for g in values["graphs"].values())
    quantized = f", {values['quantization']} weights" if values["quantization"] else ""
    return (
        f"wrote {out}: {files} ({values['family']}, head={values['head']}{quantized}); "
        f"max |onnxruntime - lmforge| at export {worst:.2e} (fp32 graph)"
    )
