"""The served model: its limits, prompt encoding, and the generation work that runs on a worker thread.

`ServedModel.work(rows, options)` returns the function a `GenerationWorker` thread runs: it left-pads the
prompt rows into one batch, drives `lmforge.generate.stream` (one batch row per prompt and choice), and
yields a `Step` per decoding step with each row's new text, finish reason and token count, stopping early
when the job is cancelled (timeout, client gone). That path has no log-probabilities (`stream` does not
record them): a request asking for logprobs there is a 400; the batching engine reports them.

Limits, checked before a job is queued so a bad request never takes a worker:
- max_tokens <= max_tokens_limit (the server's --max-tokens-limit);
- each prompt <= max_prompt_tokens (--max-prompt-tokens, default: the model's context minus one);
- a decoder's prompt + max_tokens - 1 <= its context (max_seq_len): the last new token need not be fed back.

Sampling fields a request leaves out take `defaults`: the server's flags, else the model's recorded
generation defaults, else OpenAI's (`lmforge.generate.defaults`); its end-of-sequence ids are the tokenizer's
plus those the model records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.data.tokenizers.tokenizer import ChatTemplateBudgetError
from lmforge.generate import stream
from lmforge.generate.batching import TokenLogprob
from lmforge.generate.defaults import OPENAI_DEFAULTS, SamplingDefaults
from lmforge.serve.errors import APIError, invalid
from lmforge.serve.prompts import encode, render_chat

log = logging.getLogger("lmforge.serve")


@dataclass
class Step:
    """One decoding step for every row: text released this step, finish reason (None while running),
    whether the row finished at this step, the row's completion tokens so far, and the log-probability
    entries of the tokens it returned this step (empty lists when the request asked for none, and by
    default, so producers without log-probabilities need not know of them)."""

    deltas: list[str]
    finish_reasons: list[str | None]
    just_finished: list[bool]
    completion_tokens: list[int]
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.logprobs:
            self.logprobs = [[] for _ in self.deltas]


class ServedModel:
    """A model and tokenizer behind the API, under a name (the `model` field requests must send)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        name: str,
        max_tokens_limit: int = 1024,
        max_prompt_tokens: int | None = None,
        defaults: SamplingDefaults = OPENAI_DEFAULTS,
    ) -> None:
        head = getattr(model.config, "head", None)
        if head not in ("causal_lm", "seq2seq_lm"):
            raise ValueError(f"model head {head!r} cannot generate text; serve a causal_lm or seq2seq_lm model")
        if max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit={max_tokens_limit} must be >= 1")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.encoder_decoder = head == "seq2seq_lm"
        self.context = getattr(model.config, "max_seq_len", None)
        if max_prompt_tokens is None:
            max_prompt_tokens = self.context - 1 if self.context and not self.encoder_decoder else self.context
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be >= 1")
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self.device = next(model.parameters()).device
        self.defaults = defaults.over(OPENAI_DEFAULTS)
        self.eos_token_id = self.defaults.end_ids(getattr(tokenizer, "eos_token_id", None))

    # --- prompts -----------------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        ids = encode(self.tokenizer, text)
        self._check_prompt(ids, "prompt")
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """Prompt ids of a conversation and the stop strings its format needs."""
        try:
            text, templated, stops = render_chat(self.tokenizer, messages)
        except ChatTemplateBudgetError as error:  # the server's template is at fault, not the request
            log.error("%s", error)
            raise APIError(500, str(error), "server_error", code="chat_template_error") from error
        except ValueError as error:  # the template rejected the conversation (e.g. roles out of order)
            raise invalid(str(error), "messages") from error
        ids = encode(self.tokenizer, text, templated)
        self._check_prompt(ids, "messages")
        return ids, stops

    def _check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise invalid("the prompt is empty; send at least one token of text", param)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise invalid(
                f"the prompt is {len(ids)} tokens but this server takes at most {self.max_prompt_tokens} "
                "(--max-prompt-tokens); shorten it",
                param,
                "context_length_exceeded",
            )

    # --- limits ------------------------------------------------------------------------------------------
    def room(self, prompt_tokens: int) -> int:
        """The most new tokens a prompt of this length leaves room for."""
        room = self.max_tokens_limit
        if self.context is not None:
            room = min(room, self.context if self.encoder_decoder else self.context - prompt_tokens + 1)
        return room

    def default_max_tokens(self, prompt_tokens: int, fallback: int | None) -> int:
        """max_tokens for a request that sets none: the model's recorded max_new_tokens cut to what fits,
        else `fallback` (None: all the room the prompt leaves)."""
        if self.defaults.max_new_tokens is not None:
            return min(self.defaults.max_new_tokens, self.room(prompt_tokens))
        return self.room(prompt_tokens) if fallback is None else fallback

    def check_max_tokens(self, max_tokens: int, prompt_tokens: int, param: str = "max_tokens") -> None:
        if max_tokens > self.max_tokens_limit:
            raise invalid(
                f"{param}={max_tokens} is more than this server allows ({self.max_tokens_limit}, "
                "--max-tokens-limit); ask for fewer",
                param,
            )
        if max_tokens > self.room(prompt_tokens):
            raise invalid(
                f"this model's context is {self.context} tokens, but the prompt ({prompt_tokens} tokens) plus "
                f"{param}={max_tokens} needs {prompt_tokens + max_tokens - (0 if self.encoder_decoder else 1)}; "
                "shorten the prompt or lower max_tokens",
                param,
                "context_length_exceeded",
            )

    def token_text(self, token: int) -> str:
        """The text of one token id, as logprobs report it: the tokenizer's decode of that id alone. A byte-level
        token holding part of a multi-byte character decodes to U+FFFD. An id past the tokenizer's vocabulary
        (models pad their embedding tables) has no text: "" rather than a failed request."""
        try:
            return self.tokenizer.decode([token])
        except (ValueError, IndexError, KeyError):
            return ""

    # --- generation --------------------------------------------------------------------------------------
    def work(self, rows: list[list[int]], options: dict[str, Any]):
        """The function a worker thread runs for these prompt rows (see the module docstring)."""
        if options.get("logprobs") is not None:
            raise invalid(
                f"logprobs are not supported for {type(self.model).__name__}: it is served one thread per request, "
                "without the batching engine that records log-probabilities; leave logprobs and top_logprobs unset",
                "logprobs",
            )

        def run(cancelled: threading.Event) -> Iterator[Step]:
            width = max(map(len, rows))
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            counts, done = [0] * len(rows), [False] * len(rows)
            for chunk in stream(self.model, input_ids, mask, tokenizer=self.tokenizer, **options):
                reasons = list(chunk.finish_reasons)
                counts = [c + (not d) for c, d in zip(counts, done, strict=True)]  # rows still running got one
                just_finished = [r is not None and not d for r, d in zip(reasons, done, strict=True)]
                done = [r is not None for r in reasons]
                yield Step(list(chunk.text_deltas), reasons, just_finished, list(counts))
                if cancelled.is_set():
                    return

        return run

    def sampling_options(self, request: Any, max_tokens: int, stops: list[str]) -> dict[str, Any]:
        """`stream` options from a request's sampling fields, the server's defaults where it sets none.
        Temperature 0 means greedy, as in OpenAI's API. `logprobs` (alternatives per token) is set only when
        the request asks for log-probabilities."""
        asked = SamplingDefaults(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
        )
        options = dict(
            max_new_tokens=max_tokens,
            **asked.over(self.defaults).stream_options(),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            stop_strings=[*request.stop, *stops],
            seed=request.seed,
        )
        logprobs = request.logprob_alternatives()
        if logprobs is not None:  # only when asked: `stream` (the threaded path) takes no such option
            options["logprobs"] = logprobs
        if request.ignore_eos:
            options["eos_token_id"] = []
        elif self.eos_token_id is not None:
            options["eos_token_id"] = self.eos_token_id
        return options
