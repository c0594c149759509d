"""`lmforge serve MODEL`: the OpenAI-compatible API and playground; `lmforge chat MODEL`: a terminal chat.

MODEL is a preset name (random weights; `--seed` fixes them), a real model's name, an lmforge or Hugging Face
folder, a checkpoint, a run folder or a .gguf file, loaded as `lmforge generate` loads it. Sampling defaults
come as in `lmforge generate` (flags, else the model's recorded ones, else the built-in values `--help` shows);
a request to the server that sets a sampling field overrides them all.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from lmforge.commands.generate import (
    DTYPES,
    MODEL_HELP,
    SAMPLING_PRECEDENCE,
    add_compile_argument,
    add_quantize_argument,
    add_sampling_arguments,
    compile_option,
    load_for_generation,
    sampling_defaults,
)
from lmforge.generate.defaults import OPENAI_DEFAULTS, SamplingDefaults

CHAT_DEFAULTS = SamplingDefaults(
    temperature=0.7, top_p=0.95, top_k=0, min_p=0.0, repetition_penalty=1.0, max_new_tokens=256
)
SERVE_PRECEDENCE = (
    "Sampling defaults: a request's own fields, else the flags given here, else the model's own "
    "(generation_config.json in a model folder, where a file without do_sample true means greedy; "
    "general.sampling.* in a GGUF file), else the value shown (OpenAI's API defaults)."
)


def served_name(model: str) -> str:
    """The id clients send as `model`: the preset name, or the file/folder name without `.gguf`."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else (path.name or model)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so a taken port is a clear error and port 0 picks a free one."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port; choose 0-65535 (0: any free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise RuntimeError(f"cannot listen on {host}:{port} ({error}); pick another --port or --host") from error


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_off_the_main_thread(args: argparse.Namespace):
    """`load_for_generation(args, rows=...)` (decoding steps of up to --kv-slots sequences) run on a short-lived
    thread, so that the server's main thread never runs a parallel torch op.

    Why: OpenMP (libgomp, PyTorch's CPU thread pool) keeps one team of worker threads per thread that has run a
    parallel region, for the life of that thread. Loading on the main thread leaves its team behind, and the
    engine thread that later runs every forward builds a second one; with more pool threads than cores libgomp
    stops letting idle workers spin, and each of the thousands of small ops of a decode step waits for its
    workers to wake. Measured (SmolLM2-135M int8, 1 row, 2 cores): a compiled step takes 17-19 ms on the engine
    thread after a main-thread load against 9.1-9.5 ms when the loading thread has exited (eager: 25 vs 12.8 ms).
    A thread's team goes with the thread."""
    result: dict = {}

    def load() -> None:
        try:
            result["loaded"] = load_for_generation(args, rows=args.kv_slots or args.concurrency)
        except BaseException as error:  # handed to the caller: one error, raised where it would have been
            result["error"] = error

    loader = threading.Thread(target=load, name="lmforge-load", daemon=True)
    loader.start()
    loader.join()
    if "error" in result:
        raise result["error"]
    return result["loaded"]


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lmforge.serve.app import ServeSettings, create_app
        from lmforge.serve.backend import ServedModel
    except ImportError as error:
        raise RuntimeError(f"serving needs FastAPI and uvicorn ({error}); pip install fastapi uvicorn") from error
    for name in ("concurrency", "max_tokens_limit", "kv_slots", "max_tokens_per_slot", "prefill_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.compile_warmup < 0:
        raise ValueError(f"--compile-warmup {args.compile_warmup} must be >= 0 (0: compile shapes as they come)")
    if args.prefix_cache_tokens < 0:
        raise ValueError(f"--prefix-cache-tokens {args.prefix_cache_tokens} must be >= 0 (0: no prefix caching)")
    if args.queue_size < 0 or args.timeout <= 0:
        raise ValueError(f"--queue-size {args.queue_size} must be >= 0 and --timeout {args.timeout} > 0")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    sock = listen(args.host, args.port)
    try:
        defaults = sampling_defaults(args, OPENAI_DEFAULTS)
        model, tokenizer = load_off_the_main_thread(args)
        if args.compile:  # asked for: a model without a compiled step is an error now, not a silent eager server
            from lmforge.generate.compiled import resolve_compile

            resolve_compile(model, True)
        name = args.served_model_name or served_name(args.model)
        served = ServedModel(model, tokenizer, name, args.max_tokens_limit, args.max_prompt_tokens, defaults)
        if args.max_tokens_per_slot and served.context and args.max_tokens_per_slot > served.context:
            raise ValueError(
                f"--max-tokens-per-slot {args.max_tokens_per_slot} is more than the model's context "
                f"({served.context} tokens); choose at most {served.context}"
            )
    except BaseException:
        sock.close()
        raise
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lmforge serve: %(message)s"))
    logger = logging.getLogger("lmforge.serve")
    logger.addHandler(handler)
    logger.setLevel(args.log_level.upper())
    settings = ServeSettings(
        args.concurrency,
        args.queue_size,
        args.timeout,
        api_key,
        kv_slots=args.kv_slots,
        max_tokens_per_slot=args.max_tokens_per_slot,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_tokens=args.prefix_cache_tokens,
        compile=compile_option(args),
        warmup_tokens=args.compile_warmup,
    )
    app = create_app(served, settings)
    host, port = sock.getsockname()[:2]
    if not is_loopback(args.host) and api_key is None:
        print(
            f"lmforge serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
            file=sys.stderr,
        )
    print(
        f"lmforge serve: {served.name!r} on http://{host}:{port} (playground at /, API at /v1)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=args.timeout + 5, timeout_keep_alive=5
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # the handler writes to this call's stderr: a later serve in the same process adds its own
        logger.removeHandler(handler)


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.serve.terminal import chat_loop

    defaults = sampling_defaults(args, CHAT_DEFAULTS)
    model, tokenizer = load_for_generation(args)
    try:
        chat_loop(
            model,
            tokenizer,
            sys.stdin,
            sys.stdout,
            system=args.system,
            max_new_tokens=defaults.max_new_tokens,
            interactive=sys.stdin.isatty(),
            **defaults.stream_options(),
            eos_token_id=defaults.end_ids(getattr(tokenizer, "eos_token_id", None)),
            seed=args.seed,
            compile=compile_option(args),
        )
    except BrokenPipeError:  # the reader of our output left (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's; presets: UTF-8 bytes)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_quantize_argument(p)
    p.add_argument("--seed", type=int, default=None, help="fixes a preset's random weights (and chat sampling)")


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    p = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with a playground", epilog=SERVE_PRECEDENCE
    )
    add_model_arguments(p)
    add_sampling_arguments(p, OPENAI_DEFAULTS)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set LMFORGE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL's name)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context - 1)")
    p.add_argument("--concurrency", type=int, default=8, help="requests decoding at once, in one batch")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond those (then: 503 busy)")
    p.add_argument(
        "--kv-slots", type=int, default=None, help="KV cache slots: sequences decoding at once (default: --concurrency)"
    )
    p.add_argument(
        "--max-tokens-per-slot",
        type=int,
        default=None,
        help="KV positions per slot, prompt + max_tokens - 1 (default: the model's context, at most 4096)",
    )
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=4096,
        help="prompt positions whose K/V are kept so a prompt with the same start (a system prompt) skips "
        "recomputing them (0: off)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included (then 504)")
    p.add_argument(
        "--compile-warmup",
        type=int,
        default=0,
        metavar="TOKENS",
        help="with a compiled step: before the first request, compile it for every batch size at slot lengths up "
        "to TOKENS (~1.5 min a graph the first time on 2 cores, ~8 s from the disk cache). Default 0: a new shape "
        "runs eagerly and is compiled when the server is idle",
    )
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    add_compile_argument(p)
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser(
        "chat", help="chat with a model in the terminal (streams replies; /reset, /exit)", epilog=SAMPLING_PRECEDENCE
    )
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message that starts the conversation")
    add_sampling_arguments(p, CHAT_DEFAULTS)
    add_compile_argument(p)
    p.set_defaults(func=cmd_chat)
