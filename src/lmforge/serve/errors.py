"""Errors the API returns, in OpenAI's shape: HTTP status + `{"error": {"message", "type", "param", "code"}}`.

Statuses follow OpenAI's: 400 invalid request, 401 bad or missing key, 404 unknown model or route,
429/503 overloaded, 500 server error; 504 is ours for a request that outlived `--timeout`.
"""

from __future__ import annotations

from lmforge.serve.schemas import ErrorBody, ErrorResponse


class APIError(Exception):
    """An error to send to the client as is. `type` is OpenAI's error type, `code` a stable machine name."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def server_busy(running: int, waiting: int) -> APIError:
    return APIError(
        503,
        f"server is busy: {running} requests running and {waiting} queued, the most it takes "
        "(--concurrency + --queue-size); retry shortly",
        "server_overloaded",
        code="server_busy",
    )


def timed_out(seconds: float) -> APIError:
    return APIError(
        504,
        f"request did not finish within {seconds:g} s (the server's --timeout); ask for fewer tokens or retry later",
        "timeout_error",
        code="timeout",
    )
