"""An interactive chat in the terminal: read a line, stream the model's reply, keep the conversation.

Each turn renders the whole conversation (the tokenizer's chat template, or the plain transcript of
`prompts.render_chat`) and generates the reply token by token, printing text as soon as it is final.
When the conversation no longer fits the model's context with room for the reply, the oldest turns are
dropped (the system message stays); a message the template rejects is skipped, but a template that runs
past its time or size budget ends the chat. Commands: `/reset` forgets the conversation, `/exit` (or end of
input) leaves. Reading from a pipe works the same, without the prompts, so scripts and tests can drive it.
"""

from __future__ import annotations

from typing import Any, TextIO

import torch
from torch import nn

from lmforge.data.tokenizers.tokenizer import ChatTemplateBudgetError
from lmforge.generate import stream
from lmforge.serve.prompts import encode, render_chat

HELP = "commands: /reset forgets the conversation, /exit leaves"


def fit_conversation(
    tokenizer, messages: list[dict[str, str]], room: int | None
) -> tuple[list[int], list[str], list[dict[str, str]]]:
    """Prompt ids, stop strings and the messages kept: the oldest user/assistant turns are dropped until the
    prompt is at most `room` tokens (None: no limit). Raises ValueError when even the last message alone is
    too long."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while True:
        text, templated, stops = render_chat(tokenizer, system + turns)
        ids = encode(tokenizer, text, templated)
        if room is None or len(ids) <= room:
            return ids, stops, system + turns
        if len(turns) <= 1:
            raise ValueError(f"this message is {len(ids)} tokens with the template; the model takes {room}")
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]


def chat_loop(
    model: nn.Module,
    tokenizer: Any,
    stdin: TextIO,
    stdout: TextIO,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    interactive: bool = False,
    **sampling: Any,
) -> list[dict[str, str]]:
    """Run the chat until /exit or end of input; returns the conversation. `sampling`: `stream` options
    (do_sample, temperature, top_p, seed, ...)."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    context = getattr(model.config, "max_seq_len", None)
    room = None if context is None else context - max_new_tokens + 1
    if room is not None and room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in the model's context of {context}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        sampling.setdefault("eos_token_id", eos)
    device = next(model.parameters()).device
    if interactive:
        print(HELP, file=stdout, flush=True)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        if text.startswith("/") or not text.strip():
            if text.strip():
                print(HELP, file=stdout, flush=True)
            continue
        try:
            ids, stops, messages = fit_conversation(tokenizer, [*messages, {"role": "user", "content": text}], room)
        except ChatTemplateBudgetError:
            raise  # the template, not this message, is at fault: every turn would fail the same way
        except ValueError as error:
            print(f"(skipped: {error})", file=stdout, flush=True)
            continue
        if interactive:
            print("assistant> ", end="", file=stdout, flush=True)
        reply = ""
        input_ids = torch.tensor([ids], device=device)
        options = dict(sampling, tokenizer=tokenizer, max_new_tokens=max_new_tokens, stop_strings=stops)
        for chunk in stream(model, input_ids, **options):
            reply += chunk.text_deltas[0]
            print(chunk.text_deltas[0], end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return messages
