"""The FastAPI app serving one model: its state, its guards and its error shape; the routes are in `routes`.

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status: malformed JSON,
wrong types (checked strictly), invalid Unicode and out-of-range fields are 400 (Pydantic's message, naming
the field), a missing or wrong key 401, an unknown model 404, a body over the size limit 413, a chat template
that runs past its time or size budget 500, a full queue 503 (with `Retry-After`), a timeout 504.

A request is validated and tokenised before it takes a place in the engine's queue (tokenising runs on
the thread pool: a long prompt must not stall the event loop); the model runs on the engine's thread. A
decoder-only model gets the `BatchingEngine` (continuous batching over a KV slot pool); a model it cannot
drive (encoder-decoders) gets the `ThreadedEngine` (one thread per running request). Both take
`submit(rows, options) -> Job` and report `running`, `waiting` and their KV slots.

Per-app state lives on `app.state`: `served` (the model), `settings`, `card` (its /v1/models entry),
`playground` (the page's HTML), `metrics` (what /metrics reports) and, while the app runs, `worker` (the
engine, whose counters /health reports).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lmforge.generate.batching import supports_batching
from lmforge.serve.backend import ServedModel
from lmforge.serve.engine import BatchingEngine
from lmforge.serve.errors import APIError, invalid
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.routes import router
from lmforge.serve.schemas import ModelCard
from lmforge.serve.worker import ThreadedEngine

log = logging.getLogger("lmforge.serve")

RETRY_AFTER_SECONDS = 1
"""Sent with every 503: a slot frees as soon as one generation ends, so clients (the openai client honours
the header) should come back soon rather than back off for minutes."""


@dataclass
class ServeSettings:
    """How the server admits work. Defaults match `lmforge serve`'s flags."""

    concurrency: int = 8  # requests running at once
    queue_size: int = 16  # admitted requests waiting beyond those
    timeout: float = 300.0  # seconds per request, queueing included
    api_key: str | None = None  # Bearer key for /v1/*; None: open
    max_body_bytes: int = 4 * 1024 * 1024
    kv_slots: int | None = None  # sequences decoding at once (None: concurrency)
    max_tokens_per_slot: int | None = None  # KV positions per slot (None: the context, at most 4096)
    prefill_chunk: int = 256  # prompt tokens prefilled per engine step
    prefix_cache_tokens: int = 4096  # prompt positions whose K/V are kept for reuse (0: no prefix caching)
    compile: bool | str = "auto"  # the batched decode step through torch.compile (see `BatchedDecoder`)
    warmup_tokens: int = 0  # before the first request, compile the step for slot lengths up to this (0: none)


def create_app(served: ServedModel, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving `served`. Its worker threads start with the app and stop after in-flight jobs end."""
    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.settings = settings or ServeSettings()
    app.state.card = ModelCard(id=served.name, created=int(time.time()))
    app.state.metrics = ServerMetrics()
    page = resources.files("lmforge.serve") / "static" / "playground.html"
    app.state.playground = page.read_text(encoding="utf-8")
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.middleware("http")(guard)
    app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine lives as long as the app: at start-up the app takes requests once the engine's warm-up (if
    any) is done; at shutdown (after uvicorn has let in-flight requests finish) it finishes the requests it
    holds, waiting at most one request timeout."""
    app.state.worker = worker = start_engine(app.state.served, app.state.settings)
    ready = getattr(worker, "ready", None)
    if ready is not None:  # requests are taken once the decode step is compiled (--compile-warmup)
        await asyncio.to_thread(ready.wait)
    yield
    log.info("shutting down: finishing %d running and %d queued generations", worker.running, worker.waiting)
    worker.close(app.state.settings.timeout)
    log.info("stopped")


def start_engine(served: ServedModel, settings: ServeSettings) -> BatchingEngine | ThreadedEngine:
    """Continuous batching where the model allows it, else one thread per running request."""
    admission = (settings.concurrency, settings.queue_size, settings.timeout)
    if supports_batching(served.model):
        return BatchingEngine(
            served,
            *admission,
            settings.kv_slots,
            settings.max_tokens_per_slot,
            settings.prefill_chunk,
            settings.prefix_cache_tokens,
            settings.compile,
            settings.warmup_tokens,
        )
    log.info("%s cannot be batched step by step: one thread per request", type(served.model).__name__)
    return ThreadedEngine(served, *admission)


# --- guards -----------------------------------------------------------------------------------------------
async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Body size and API key, checked before the body is read or parsed."""
    settings: ServeSettings = request.app.state.settings
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > settings.max_body_bytes:
        return error_response(
            APIError(413, f"request body is {size} bytes; this server takes at most {settings.max_body_bytes}")
        )
    if settings.api_key is not None and request.url.path.startswith("/v1/"):
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            message = "no API key given; send the header 'Authorization: Bearer <key>'"
            return error_response(APIError(401, message, code="invalid_api_key"))
        if not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            message = "incorrect API key; use the key the server was started with"
            return error_response(APIError(401, message, code="invalid_api_key"))
    return await call_next(request)


# --- errors -----------------------------------------------------------------------------------------------
def error_response(error: APIError) -> JSONResponse:
    """The error in OpenAI's shape; a 503 says when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(validation_to_api_error(error))


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method), reshaped; the message names the request."""
    return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A bug: the client learns only its type (details may be private); the log has the traceback."""
    message = f"internal server error ({type(error).__name__}); see the server's log"
    return error_response(APIError(500, message, "server_error"))


def is_type_tag(part: str | int) -> bool:
    """Pydantic puts the union member that failed in `loc` ("str", "list[str]", "TextPart"): not a field."""
    return isinstance(part, str) and (
        part in ("str", "int", "float", "bool", "list", "dict") or "[" in part or part[:1].isupper()
    )


def validation_to_api_error(error: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one clear line naming the field, e.g. "max_tokens: Input should be
    greater than or equal to 1 (got -5)". A field that may take several types (`stop`: a string or a list of
    strings) gets one complaint per type; the deepest is the one that got furthest (a list with one bad
    string), so it is the one named."""
    errors = error.errors()
    field = errors[0].get("loc", ())[:2]
    first = max((e for e in errors if e.get("loc", ())[:2] == field), key=lambda e: len(e.get("loc", ())))
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
