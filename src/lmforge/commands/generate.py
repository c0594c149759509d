"""`lmforge generate MODEL --prompt ...`: text from a preset (random weights) or trained weights (a real model's
name, a saved model, a checkpoint or a run folder: `lmforge.hf.resolve`).

Sampling defaults (shared with `chat` and `serve`, see `lmforge.generate.defaults`): a flag given on the
command line, else what the model records (a folder's generation_config.json, a GGUF's general.sampling.*),
else the command's built-in value, which `--help` shows.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from lmforge.generate.defaults import SamplingDefaults, model_defaults

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GENERATE_DEFAULTS = SamplingDefaults(
    temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_new_tokens=64
)
MODEL_HELP = (
    "preset name (random weights), real model name (SmolLM2-135M-Instruct), lmforge or Hugging Face folder, "
    "checkpoint, run folder (its best checkpoint), .gguf file or ONNX export (lmforge export --to onnx)"
)
SAMPLING_PRECEDENCE = (
    "Sampling defaults: a flag given here, else the model's own (generation_config.json in a model folder, "
    "where a file without do_sample true means greedy; general.sampling.* in a GGUF file), else the value shown."
)


class ByteTokenizer:
    """The fallback for presets without a tokenizer: token id = one UTF-8 byte (needs vocab_size >= 256).
    Decoding replaces an incomplete trailing byte sequence with U+FFFD, as byte-level BPE decoders do."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_model_and_tokenizer(name: str, tokenizer_path: str | None):
    """A preset name builds random weights (with --tokenizer or the byte fallback); anything else
    `lmforge.hf.resolve.resolve_model` accepts (a real model's name, a folder, a checkpoint, a run folder, a
    .gguf file) is loaded with the tokenizer saved beside it."""
    from lmforge.hf.resolve import resolve_model
    from lmforge.models import build_model

    source = resolve_model(name)
    if source.path is None or source.kind == "onnx":
        if source.kind == "onnx":  # an ONNX export runs on onnxruntime behind the same forward
            from lmforge.export.onnx_runtime import load_onnx_model

            model = load_onnx_model(source.path)
            if tokenizer_path is None and _has_tokenizer(source.path):
                tokenizer_path = str(source.path)
        else:
            model = build_model(name)
        if tokenizer_path is not None:
            return model, _load_tokenizer(tokenizer_path)
        if model.config.vocab_size < 256:
            raise ValueError(
                f"{name!r} has no tokenizer and vocab_size={model.config.vocab_size} < 256; pass --tokenizer"
            )
        return model, ByteTokenizer()
    from lmforge.hf.load import load_model

    return load_model(source.path), _load_tokenizer(tokenizer_path or str(source.path))


def _has_tokenizer(folder) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt"))


def _load_tokenizer(path: str):
    from lmforge.data.tokenizers.tokenizer import load_tokenizer

    return load_tokenizer(path)


def load_for_generation(args: argparse.Namespace, rows: int = 1):
    """The model (eval mode, cast to --dtype, optionally int8-quantised, weights laid out for decoding steps of
    up to `rows` sequences: `serve` passes its --concurrency) and its tokenizer; `serve` and `chat` share this.
    --seed also fixes a preset's random weights."""
    from lmforge.generate import prepare_for_decoding

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
    if hasattr(model, "sessions") and (args.dtype != "float32" or args.quantize != "none"):
        raise ValueError(
            f"{args.model} is an ONNX export, which runs as exported (fp32); drop --dtype/--quantize, or export "
            "with lmforge export MODEL --to onnx --quantize int8"
        )
    model = model.to(DTYPES[args.dtype]).eval()
    return prepare_for_decoding(quantize_for_decoding(model, args.quantize), rows), tokenizer


QUANTIZE_CHOICES = ("none", "int8", "int4")


def quantize_for_decoding(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """--quantize, in place. int8: every Linear weight-only int8, one scale per output channel. int4: the
    Linears inside the Transformer blocks in 4 bits, groups of 32 inputs on their min-max grid (the grid of
    llama.cpp's Q4_1, so a Q4_1 GGUF's block weights round back onto themselves), run by lmforge's int4 kernel;
    the output projection int8, as llama.cpp's Q4 files keep theirs in 8 bits (its errors land on the logits).
    Blocks that are already int4 (a `lmforge quantize --method int4` folder) are kept as they are."""
    from lmforge.nn.quant import quantize_int8

    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {kind!r} is not supported; choose one of {list(QUANTIZE_CHOICES)}")
    if kind == "int4":
        from lmforge.quantize.recipe import quantize_model

        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(
                f"--quantize int4 quantises Transformer blocks, and {type(model).__name__} has none; "
                "use --quantize int8"
            )
        for name, layer in blocks.named_modules():
            if isinstance(layer, torch.nn.Linear) and layer.in_features % 32:
                raise ValueError(
                    f"--quantize int4 takes groups of 32 inputs, and blocks.{name} has "
                    f"{layer.in_features}; use --quantize int8"
                )
        quantize_model(model, "int4", group_size=32)
    return model if kind == "none" else quantize_int8(model)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="weight-only: int8 (every Linear, per channel) or int4 (the blocks in groups of 32 on lmforge's "
        "int4 kernel, the output projection int8)",
    )


def add_sampling_arguments(p: argparse.ArgumentParser, builtin: SamplingDefaults) -> None:
    """--temperature, --top-p, --top-k, --min-p, --repetition-penalty and, when `builtin` sets one,
    --max-new-tokens. Each defaults to None (read `sampling_defaults`), so a flag given on the command line
    can be told from one left to the model; the help names the built-in value."""

    def default(name: str) -> str:
        value = getattr(builtin, name)
        return f"(default: the model's, else {value:g})"

    p.add_argument("--temperature", type=float, help=f"0 means greedy {default('temperature')}")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass; 1 turns it off {default('top_p')}")
    p.add_argument("--top-k", type=int, help=f"keep the k likeliest tokens; 0 turns it off {default('top_k')}")
    p.add_argument("--min-p", type=float, help=f"min-p cut-off; 0 turns it off {default('min_p')}")
    p.add_argument("--repetition-penalty", type=float, help=f"1 turns it off {default('repetition_penalty')}")
    if builtin.max_new_tokens is not None:
        p.add_argument("--max-new-tokens", type=int, help=f"tokens to generate {default('max_new_tokens')}")


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    """--compile/--no-compile; neither means "auto" (`lmforge.generate.compiled.resolve_compile`)."""
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode each new token through one torch.compile'd graph (the first run compiles, 1-2 minutes on "
        "a small CPU, later runs load it from the disk cache in seconds); --no-compile decodes eagerly (default: "
        "compile decoder-only models of 100M parameters or more for 1024 new tokens or more)",
    )


def compile_option(args: argparse.Namespace) -> bool | str:
    return "auto" if args.compile is None else args.compile


def sampling_defaults(args: argparse.Namespace, builtin: SamplingDefaults) -> SamplingDefaults:
    """The flags given, over the model's recorded defaults, over `builtin`; checked now, so that a bad value
    is one error at start rather than one per generation (or per request, for a server)."""
    from lmforge.generate import SamplingParams

    flags = SamplingDefaults(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_new_tokens=getattr(args, "max_new_tokens", None),
    )
    from lmforge.hf.resolve import resolve_model

    source = resolve_model(args.model)  # the folder or file a name, run folder or checkpoint stands for
    defaults = flags.over(model_defaults(str(source.path) if source.path else args.model), builtin)
    SamplingParams(**defaults.stream_options()).validate()
    return defaults


def cmd_generate(args: argparse.Namespace) -> None:
    with torch.inference_mode():  # a context, not a global switch: main() also runs in-process (tests, notebooks)
        run_generate(args)


def run_generate(args: argparse.Namespace) -> None:
    from lmforge.generate import encode_prompts, generate, stream

    defaults = sampling_defaults(args, GENERATE_DEFAULTS)
    if args.greedy:
        defaults = replace(defaults, temperature=0.0)
    # every prompt (and beam) is a row of each decoding step: bf16 steps of more rows than the matrix-vector
    # kernel takes run on a pair-interleaved copy of the weights (prepare_for_decoding), not on F.linear
    model, tokenizer = load_for_generation(args, rows=len(args.prompt) * max(1, args.num_beams))
    input_ids, attention_mask = encode_prompts(tokenizer, args.prompt, chat=args.chat)
    options = dict(
        max_new_tokens=defaults.max_new_tokens,
        **defaults.stream_options(),
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        eos_token_id=defaults.end_ids(getattr(tokenizer, "eos_token_id", None)),
        stop_strings=args.stop,
        tokenizer=tokenizer,
        seed=args.seed,
        compile=compile_option(args),
    )
    start = time.perf_counter()
    if len(args.prompt) == 1 and args.num_beams == 1:
        n_tokens, reason = 0, None
        for chunk in stream(model, input_ids, attention_mask, **options):
            print(chunk.text_deltas[0], end="", flush=True)
            n_tokens, reason = n_tokens + 1, chunk.finish_reasons[0]
        print()
        reasons = [reason]
    else:
        if args.num_beams > 1:  # beam search is deterministic: no sampling options
            options = {k: options[k] for k in ("max_new_tokens", "repetition_penalty", "eos_token_id", "tokenizer")}
            if args.compile:
                raise ValueError("beam search decodes eagerly; drop --compile or use --num-beams 1")
        out = generate(model, input_ids, attention_mask, num_beams=args.num_beams, **options)
        for prompt, text in zip(args.prompt, out.texts, strict=True):
            print(f"{prompt}{text}\n")
        n_tokens, reasons = out.tokens.numel(), out.finish_reasons
    elapsed = time.perf_counter() - start
    print(f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tok/s; finish: {reasons}]", file=sys.stderr)


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser(
        "generate", help="generate text from a preset (random weights) or a saved model", epilog=SAMPLING_PRECEDENCE
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's; presets: UTF-8 bytes)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--greedy", action="store_true", help="take the most likely token (no sampling): --temperature 0")
    add_sampling_arguments(p, GENERATE_DEFAULTS)
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and a preset's random weights)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (greedy beams, no sampling)")
    add_compile_argument(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_quantize_argument(p)
    p.set_defaults(func=cmd_generate)
