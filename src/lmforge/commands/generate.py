"""`lmforge generate MODEL --prompt ...`: text from a preset (random weights) or a saved model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ByteTokenizer:
    """The fallback for presets without a tokenizer: token id = one UTF-8 byte (needs vocab_size >= 256).
    Decoding replaces an incomplete trailing byte sequence with U+FFFD, as byte-level BPE decoders do."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_model_and_tokenizer(name: str, tokenizer_path: str | None):
    """A preset name builds random weights (with --tokenizer or the byte fallback); a path is loaded."""
    from lmforge.models import PRESETS, build_model

    if name in PRESETS:
        model = build_model(name)
        if tokenizer_path is not None:
            return model, _load_tokenizer(tokenizer_path)
        if model.config.vocab_size < 256:
            raise ValueError(f"preset {name!r} has vocab_size={model.config.vocab_size} < 256; pass --tokenizer")
        return model, ByteTokenizer()
    if not Path(name).exists():
        raise FileNotFoundError(f"{name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path")
    from lmforge.hf.load import load_model

    return load_model(name), _load_tokenizer(tokenizer_path or name)


def _load_tokenizer(path: str):
    from lmforge.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def load_for_generation(args: argparse.Namespace):
    """The model (eval mode, cast to --dtype, optionally int8-quantised, weights laid out for decoding) and its
    tokenizer; `serve` and `chat` share this. --seed also fixes a preset's random weights."""
    from lmforge.generate import prepare_for_decoding
    from lmforge.nn.quant import quantize_int8

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
    model = model.to(DTYPES[args.dtype]).eval()
    if args.quantize == "int8":
        quantize_int8(model)
    return prepare_for_decoding(model), tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    with torch.inference_mode():  # a context, not a global switch: main() also runs in-process (tests, notebooks)
        run_generate(args)


def run_generate(args: argparse.Namespace) -> None:
    from lmforge.generate import encode_prompts, generate, stream

    model, tokenizer = load_for_generation(args)
    input_ids, attention_mask = encode_prompts(tokenizer, args.prompt, chat=args.chat)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy and args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        stop_strings=args.stop,
        tokenizer=tokenizer,
        seed=args.seed,
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
        out = generate(model, input_ids, attention_mask, num_beams=args.num_beams, **options)
        for prompt, text in zip(args.prompt, out.texts, strict=True):
            print(f"{prompt}{text}\n")
        n_tokens, reasons = out.tokens.numel(), out.finish_reasons
    elapsed = time.perf_counter() - start
    print(f"[{n_tokens} tokens in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tok/s; finish: {reasons}]", file=sys.stderr)


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser("generate", help="generate text from a preset (random weights) or a saved model")
    p.add_argument("model", help="preset name (random weights) or a model path loaded with lmforge.load_model")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's; presets: UTF-8 bytes)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and a preset's random weights)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (greedy beams, no sampling)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="int8 weight-only linears")
    p.set_defaults(func=cmd_generate)
