"""The OpenAI-compatible HTTP API and the playground page, as a FastAPI app.

Routes:
    GET  /                       the playground (static/playground.html)
    GET  /health                 {"status": "ok", "model", "running", "waiting", ...}; never needs a key
    GET  /v1/models, /v1/models/{id}
    POST /v1/completions         prompt -> text; `stream: true` sends server-sent events
    POST /v1/chat/completions    messages -> assistant message; streams likewise

Streams follow OpenAI's format: one `data: <JSON chunk>` event per decoding step that produced text, a
last chunk per choice carrying `finish_reason`, an optional usage chunk (`stream_options.include_usage`),
then `data: [DONE]`. An error after the stream began (timeout) is sent as a `data: {"error": ...}` event.

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status: malformed JSON,
wrong types and out-of-range fields are 400 (Pydantic's message, naming the field), a missing or wrong key
401, an unknown model 404, a body over the size limit 413, a full queue 503, a timeout 504.

A request is validated and tokenised before it takes a place in the worker's queue (tokenising runs on
the thread pool: a long prompt must not stall the event loop); the model runs on the worker's threads.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lmforge.serve import errors
from lmforge.serve.backend import ServedModel, Step
from lmforge.serve.errors import APIError, invalid
from lmforge.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
)
from lmforge.serve.worker import GenerationWorker, Job, JobTimeout, ServerBusy

log = logging.getLogger("lmforge.serve")


@dataclass
class ServeSettings:
    """How the server admits work. Defaults match `lmforge serve`'s flags."""

    concurrency: int = 1  # generations running at once
    queue_size: int = 16  # admitted requests waiting for a worker
    timeout: float = 300.0  # seconds per request, queueing included
    api_key: str | None = None  # Bearer key for /v1/*; None: open
    max_body_bytes: int = 4 * 1024 * 1024


def create_app(served: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving `served`. Its worker threads start with the app and stop after in-flight jobs end."""
    settings = settings or ServeSettings()
    created = int(time.time())
    playground = (resources.files("lmforge.serve") / "static" / "playground.html").read_text(encoding="utf-8")
    state: dict[str, GenerationWorker] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["worker"] = GenerationWorker(settings.concurrency, settings.queue_size, settings.timeout)
        yield
        worker = state["worker"]
        log.info("shutting down: finishing %d running and %d queued generations", worker.running, worker.waiting)
        worker.close(settings.timeout)
        log.info("stopped")

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)

    # --- errors -------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_to_api_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        error = APIError(500, f"internal server error ({type(error).__name__}); see the server's log", "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size and API key, checked before the body is read or parsed."""
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > settings.max_body_bytes:
            error = APIError(413, f"request body is {size} bytes; this server takes at most {settings.max_body_bytes}")
            return JSONResponse(error.body(), status_code=413)
        if settings.api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key:
                error = APIError(
                    401, "no API key given; send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
                return JSONResponse(error.body(), status_code=401)
            if not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
                error = APIError(
                    401, "incorrect API key; use the key the server was started with", code="invalid_api_key"
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    # --- pages and metadata -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        worker = state["worker"]
        return {
            "status": "ok",
            "model": served.name,
            "running": worker.running,
            "waiting": worker.waiting,
            "concurrency": settings.concurrency,
            "queue_size": settings.queue_size,
        }

    card = ModelCard(id=served.name, created=created)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id, "model_id")
        return card

    def check_model(name: str, param: str = "model") -> None:
        if name != served.name:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {served.name!r}",
                param=param,
                code="model_not_found",
            )

    def submit(rows: list[list[int]], options: dict[str, Any]) -> Job:
        try:
            return state["worker"].submit(served.work(rows, options))
        except ServerBusy as busy:
            raise errors.server_busy(busy.running, busy.waiting) from None

    # --- completions --------------------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompt_ids = await run_in_threadpool(lambda: [served.encode_prompt(p) for p in prompts])
        for ids in prompt_ids:
            served.check_max_tokens(body.max_tokens, len(ids))
        n_prompt = sum(map(len, prompt_ids))
        rows = [ids for ids in prompt_ids for _ in range(body.n)]  # choice i*n + j: prompt i, sample j
        prefixes = [p if body.echo else "" for p in prompts for _ in range(body.n)]
        job = submit(rows, served.sampling_options(body, body.max_tokens, []))
        reply_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(Completion(id=reply_id, created=now, model=served.name, choices=choices, usage=usage))

        if body.stream:

            async def events() -> AsyncIterator[str]:
                for i, prefix in enumerate(prefixes):
                    if prefix:
                        yield chunk([CompletionChoice(index=i, text=prefix, finish_reason=None)])
                last = None
                async for step in job_events(job):
                    last = step
                    for i, (delta, reason) in enumerate(zip(step.deltas, step.finish_reasons, strict=True)):
                        if delta or step.just_finished[i]:
                            yield chunk([CompletionChoice(index=i, text=delta, finish_reason=reason)])
                if body.stream_options and body.stream_options.include_usage and last is not None:
                    yield chunk([], usage_of(n_prompt, last))

            return stream_response(events())
        texts, last = await collect(job, len(rows))
        choices = [
            CompletionChoice(index=i, text=prefixes[i] + text, finish_reason=last.finish_reasons[i])
            for i, text in enumerate(texts)
        ]
        return Completion(id=reply_id, created=now, model=served.name, choices=choices, usage=usage_of(n_prompt, last))

    # --- chat ---------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        messages = [{"role": chat_role(m.role), "content": m.text()} for m in body.messages]
        ids, stops = await run_in_threadpool(served.encode_chat, messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = served.room(len(ids))
            if max_tokens < 1:
                served.check_max_tokens(1, len(ids), "messages")
        served.check_max_tokens(max_tokens, len(ids), param)
        rows, n_prompt = [ids] * body.n, len(ids)
        job = submit(rows, served.sampling_options(body, max_tokens, stops))
        reply_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=reply_id, created=now, model=served.name, choices=choices, usage=usage))

        if body.stream:

            async def events() -> AsyncIterator[str]:
                for i in range(len(rows)):
                    yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
                last = None
                async for step in job_events(job):
                    last = step
                    for i, (delta, reason) in enumerate(zip(step.deltas, step.finish_reasons, strict=True)):
                        if delta:
                            yield chunk([ChatChunkChoice(index=i, delta={"content": delta})])
                        if step.just_finished[i]:
                            yield chunk([ChatChunkChoice(index=i, delta={}, finish_reason=reason)])
                if body.stream_options and body.stream_options.include_usage and last is not None:
                    yield chunk([], usage_of(n_prompt, last))

            return stream_response(events())
        texts, last = await collect(job, len(rows))
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=last.finish_reasons[i])
            for i, text in enumerate(texts)
        ]
        return ChatCompletion(
            id=reply_id, created=now, model=served.name, choices=choices, usage=usage_of(n_prompt, last)
        )

    # --- shared -------------------------------------------------------------------------------------------
    async def job_events(job: Job) -> AsyncIterator[Step]:
        """The job's steps; its errors become APIErrors."""
        try:
            async for step in job.events():
                yield step
        except JobTimeout:
            raise errors.timed_out(settings.timeout) from None
        except ValueError as error:  # the engine's checks on the options
            raise invalid(str(error)) from error
        except APIError:
            raise
        except Exception as error:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error") from error

    async def collect(job: Job, n_rows: int) -> tuple[list[str], Step]:
        texts, last = [""] * n_rows, None
        async for step in job_events(job):
            texts = [text + delta for text, delta in zip(texts, step.deltas, strict=True)]
            last = step
        if last is None:
            raise APIError(500, "generation ended without producing a step", "server_error")
        return texts, last

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        async def with_done() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except APIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(with_done(), media_type="text/event-stream", headers=headers)

    return app


def chat_role(role: str) -> str:
    """OpenAI's "developer" messages are the newer name for system messages; templates know "system"."""
    return "system" if role == "developer" else role


def usage_of(prompt: int, last: Step) -> Usage:
    """Token counts: each distinct prompt once (n choices share it, as in OpenAI's counts), every choice's reply."""
    completion = sum(last.completion_tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def is_type_tag(part: str | int) -> bool:
    """Pydantic puts the union member that failed in `loc` ("str", "list[str]", "TextPart"): not a field."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict") or "[" in part or part[:1].isupper()
    )


def validation_to_api_error(error: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one clear line naming the field, e.g. "max_tokens: Input should be
    greater than or equal to 1 (got -5)"."""
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not is_type_tag(part)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "could not parse it")
        return invalid(f"request body is not valid JSON ({reason}); send a JSON object", None, "invalid_json")
    if not loc and first.get("type") == "missing":
        return invalid("request body is missing; send a JSON object with the request's fields")
    if not loc:
        return invalid(f"request body must be a JSON object: {first.get('msg')}")
    message = f"{param}: {first.get('msg')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return invalid(message, param)
