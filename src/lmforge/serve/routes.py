"""The routes of the OpenAI-compatible API and the playground page, on one `APIRouter`.

Routes:
    GET  /                       the playground (static/playground.html)
    GET  /health                 {"status": "ok", "model", "running", "waiting", ...}; never needs a key
    GET  /metrics                Prometheus text format (`metrics`); never needs a key
    GET  /v1/models, /v1/models/{id}
    POST /v1/completions         prompt -> text; `stream: true` sends server-sent events
    POST /v1/chat/completions    messages -> assistant message; streams likewise

Streams follow OpenAI's format: one `data: <JSON chunk>` event per decoding step that produced text, a
last chunk per choice carrying `finish_reason`, an optional usage chunk (`stream_options.include_usage`),
then `data: [DONE]`. An error after the stream began (timeout) is sent as a `data: {"error": ...}` event.
A request asking for logprobs gets them per choice (`null` otherwise); streamed, each chunk carries the
log-probabilities of the tokens chosen at its step (a token's text may come a chunk later, held back while a
stop string could be forming, or never, when the stop string cuts it).

The handlers hold no state of their own: the served model, the settings, the model card, the playground page
the metrics and the engine live on `request.app.state` (set by `create_app` and its lifespan), so one router serves any
number of apps.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from lmforge.generate.batching import TokenLogprob
from lmforge.serve import errors
from lmforge.serve.backend import ServedModel, Step
from lmforge.serve.errors import APIError, invalid
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenLogprobs,
    TopLogprob,
    Usage,
)
from lmforge.serve.worker import Job, JobTimeout, ServerBusy

log = logging.getLogger("lmforge.serve")
router = APIRouter()
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens for a completion that sets none
LOWEST_LOGPROB = -9999.0  # how -inf (a token the model rules out) is reported: JSON has no infinity (vLLM does so too)


# --- pages and metadata -----------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.playground)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {
        "status": "ok",
        "model": state.served.name,
        "running": state.worker.running,
        "waiting": state.worker.waiting,
        "concurrency": state.settings.concurrency,
        "queue_size": state.settings.queue_size,
        "kv_slots": state.worker.kv_slots,
        "kv_slots_used": state.worker.kv_slots_used,
    }


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    text = request.app.state.metrics.render(request.app.state.worker)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[request.app.state.card])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    check_model(request.app.state.served, model_id, "model_id")
    return request.app.state.card


# --- completions ------------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state
    served: ServedModel = state.served
    check_model(served, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    prompt_ids = await run_in_threadpool(lambda: [served.encode_prompt(p) for p in prompts])
    longest = max(map(len, prompt_ids))
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = min(served.default_max_tokens(longest, DEFAULT_COMPLETION_TOKENS), state.worker.room(longest))
        if max_tokens < 1:
            served.check_max_tokens(1, longest, "prompt")
    for ids in prompt_ids:
        served.check_max_tokens(max_tokens, len(ids))
    n_prompt = sum(map(len, prompt_ids))
    rows = [ids for ids in prompt_ids for _ in range(body.n)]  # choice i*n + j: prompt i, sample j
    prefixes = [p if body.echo else "" for p in prompts for _ in range(body.n)]
    job = submit(state, rows, served.sampling_options(body, max_tokens, []))
    timeout = state.settings.timeout
    reply_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    offsets = [len(prefix) for prefix in prefixes]  # where each choice's next token starts in its text

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(Completion(id=reply_id, created=now, model=served.name, choices=choices, usage=usage))

    def logprobs(i: int, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        reported, offsets[i] = completion_logprobs(served, entries, offsets[i])
        return reported

    if body.stream:

        async def events() -> AsyncIterator[str]:
            for i, prefix in enumerate(prefixes):
                if prefix:
                    yield chunk([CompletionChoice(index=i, text=prefix, finish_reason=None)])
            last = None
            async for step in job_events(job, timeout, state.metrics):
                last = step
                for i, (delta, reason) in enumerate(zip(step.deltas, step.finish_reasons, strict=True)):
                    if delta or step.just_finished[i] or step.logprobs[i]:
                        lp = logprobs(i, step.logprobs[i])
                        yield chunk([CompletionChoice(index=i, text=delta, logprobs=lp, finish_reason=reason)])
            if body.stream_options and body.stream_options.include_usage and last is not None:
                yield chunk([], usage_of(n_prompt, last))

        return stream_response(events())
    texts, entries, last = await collect(job, len(rows), timeout, state.metrics)
    choices = [
        CompletionChoice(
            index=i, text=prefixes[i] + text, logprobs=logprobs(i, entries[i]), finish_reason=last.finish_reasons[i]
        )
        for i, text in enumerate(texts)
    ]
    return Completion(id=reply_id, created=now, model=served.name, choices=choices, usage=usage_of(n_prompt, last))


# --- chat -------------------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    served: ServedModel = state.served
    check_model(served, body.model)
    messages = [{"role": chat_role(m.role), "content": m.text()} for m in body.messages]
    ids, stops = await run_in_threadpool(served.encode_chat, messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        max_tokens = min(served.default_max_tokens(len(ids), None), state.worker.room(len(ids)))
        if max_tokens < 1:
            served.check_max_tokens(1, len(ids), "messages")
    served.check_max_tokens(max_tokens, len(ids), param)
    rows, n_prompt = [ids] * body.n, len(ids)
    job = submit(state, rows, served.sampling_options(body, max_tokens, stops))
    timeout = state.settings.timeout
    reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(ChatCompletionChunk(id=reply_id, created=now, model=served.name, choices=choices, usage=usage))

    def logprobs(entries: list[TokenLogprob]) -> ChatLogprobs | None:
        return chat_logprobs(served, entries) if body.logprobs else None

    if body.stream:

        async def events() -> AsyncIterator[str]:
            for i in range(len(rows)):
                yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
            last = None
            async for step in job_events(job, timeout, state.metrics):
                last = step
                for i, (delta, reason) in enumerate(zip(step.deltas, step.finish_reasons, strict=True)):
                    if delta or step.logprobs[i]:
                        lp = logprobs(step.logprobs[i])
                        yield chunk([ChatChunkChoice(index=i, delta={"content": delta}, logprobs=lp)])
                    if step.just_finished[i]:
                        yield chunk([ChatChunkChoice(index=i, delta={}, finish_reason=reason)])
            if body.stream_options and body.stream_options.include_usage and last is not None:
                yield chunk([], usage_of(n_prompt, last))

        return stream_response(events())
    texts, entries, last = await collect(job, len(rows), timeout, state.metrics)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=text),
            logprobs=logprobs(entries[i]),
            finish_reason=last.finish_reasons[i],
        )
        for i, text in enumerate(texts)
    ]
    return ChatCompletion(id=reply_id, created=now, model=served.name, choices=choices, usage=usage_of(n_prompt, last))


# --- shared -----------------------------------------------------------------------------------------------
def check_model(served: ServedModel, name: str, param: str = "model") -> None:
    """A request naming another model is a 404, as OpenAI answers for a model you cannot use."""
    if name != served.name:
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {served.name!r}",
            param=param,
            code="model_not_found",
        )


def submit(state: State, rows: list[list[int]], options: dict[str, Any]) -> Job:
    """Admit the generation to the app's engine; a full queue is a 503 now rather than a long wait."""
    try:
        return state.worker.submit(rows, options)
    except ServerBusy as busy:
        raise errors.server_busy(busy.running, busy.waiting) from None
    except ValueError as error:  # the sampler's checks on the options
        raise invalid(str(error)) from error


async def job_events(job: Job, timeout: float, metrics: ServerMetrics) -> AsyncIterator[Step]:
    """The job's steps, timed into `metrics`; its errors become APIErrors (`timeout` is only quoted in the
    504's message)."""
    last, tokens = time.monotonic(), 0
    try:
        async for step in job.events():
            now, total = time.monotonic(), sum(step.completion_tokens)
            if total > tokens:
                latency = metrics.time_to_first_token if tokens == 0 else metrics.inter_token_latency
                latency.observe(now - last)
                metrics.add_tokens(total - tokens)
                last, tokens = now, total
            yield step
    except JobTimeout:
        raise errors.timed_out(timeout) from None
    except ValueError as error:  # the engine's checks on the options
        raise invalid(str(error)) from error
    except APIError:
        raise
    except Exception as error:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error") from error


async def collect(
    job: Job, n_rows: int, timeout: float, metrics: ServerMetrics
) -> tuple[list[str], list[list[TokenLogprob]], Step]:
    """Every choice's whole text, its log-probability entries (empty unless asked for) and the last step
    (its finish reasons and token counts), for a reply that is not streamed."""
    texts, entries, last = [""] * n_rows, [[] for _ in range(n_rows)], None
    async for step in job_events(job, timeout, metrics):
        texts = [text + delta for text, delta in zip(texts, step.deltas, strict=True)]
        for row, new in zip(entries, step.logprobs, strict=True):
            row.extend(new)
        last = step
    if last is None:
        raise APIError(500, "generation ended without producing a step", "server_error")
    return texts, entries, last


def reported(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (and NaN, from a broken forward) become LOWEST_LOGPROB."""
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB


def top_logprob(served: ServedModel, token: int, logprob: float) -> TopLogprob:
    text = served.token_text(token)
    return TopLogprob(token=text, logprob=reported(logprob), bytes=list(text.encode("utf-8")))


def chat_logprobs(served: ServedModel, entries: list[TokenLogprob]) -> ChatLogprobs:
    """Chat's shape: per token its text, log-probability, UTF-8 bytes and the most likely alternatives."""
    content = [
        TokenLogprobs(
            **top_logprob(served, entry.token, entry.logprob).model_dump(),
            top_logprobs=[top_logprob(served, token, logprob) for token, logprob in entry.top],
        )
        for entry in entries
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(
    served: ServedModel, entries: list[TokenLogprob], offset: int
) -> tuple[CompletionLogprobs, int]:
    """Completions' shape for tokens whose text starts at character `offset` of the choice's text, and the
    offset after them. top_logprobs holds the alternatives and the chosen token, as OpenAI's (up to k + 1)."""
    tokens = [served.token_text(entry.token) for entry in entries]
    starts = list(itertools.accumulate(map(len, tokens), initial=offset))
    top = [
        {served.token_text(token): reported(logprob) for token, logprob in [*entry.top, (entry.token, entry.logprob)]}
        for entry in entries
    ]
    logprobs = CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[reported(entry.logprob) for entry in entries],
        top_logprobs=top,
        text_offset=starts[:-1],
    )
    return logprobs, starts[-1]


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events ending in `[DONE]`; an error once the 200 is sent can only travel as an event."""

    async def with_done() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(with_done(), media_type="text/event-stream", headers=headers)


def chat_role(role: str) -> str:
    """OpenAI's "developer" messages are the newer name for system messages; templates know "system"."""
    return "system" if role == "developer" else role


def usage_of(prompt: int, last: Step) -> Usage:
    """Token counts: each distinct prompt once (n choices share it, as in OpenAI's counts), every choice's reply."""
    completion = sum(last.completion_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
