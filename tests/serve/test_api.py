"""The HTTP API's guarantees against real `lmforge serve` processes: each bad request gets the right 4xx in
OpenAI's error shape with a clear message and the server keeps serving; a full queue answers 503 at once, with
`Retry-After`; a request past --timeout gets 504 and frees its worker; SIGTERM lets in-flight requests finish."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
LOOPING_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # 10^10 steps
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 16000  # tokens of a request that the `tight` server (16,384-token context) cannot finish in its 2 s


@pytest.fixture(scope="module")
def guarded(start_server, checkpoint):
    """A server with an API key and small limits."""
    args = [str(checkpoint), "--api-key", KEY, "--max-tokens-limit", "64", "--max-prompt-tokens", "32"]
    server = start_server(args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tight(start_server, long_checkpoint):
    """One worker, one queue slot, 2 s per request: a 16,000-token request can never finish in time."""
    args = [str(long_checkpoint), "--concurrency", "1", "--queue-size", "1", "--timeout", "2"]
    args += ["--max-tokens-limit", str(LONG), "--max-tokens-per-slot", str(LONG + 64)]
    server = start_server(args)
    yield server
    server.stop()


def assert_error(status: int, body, expected_status: int, *fragments: str, param=None, code=None) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    message = body["error"]["message"]
    assert all(f in message for f in fragments), message
    assert body["error"]["param"] == param and body["error"]["code"] == code


def assert_still_serving(server, headers=None) -> None:
    payload = {"model": server_model(server), "prompt": "still there?", "max_tokens": 2}
    status, body = server.post("/v1/completions", payload, headers)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    status, health = server.get("/health")
    assert status == 200 and health["status"] == "ok"


def server_model(server) -> str:
    return server.get("/health")[1]["model"]


def chat(**fields):
    return {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


BAD_REQUESTS = {
    "malformed json": (b'{"model": "tiny-chat", "messages": [', 400, ["not valid JSON"], None, "invalid_json"),
    "body not an object": (b"[1, 2]", 400, ["must be a JSON object"], None, None),
    "messages wrong type": (chat(messages="hi"), 400, ["messages: Input should be a valid list"], "messages", None),
    "temperature wrong type": (chat(temperature="hot"), 400, ["temperature", '"hot"'], "temperature", None),
    "temperature too high": (chat(temperature=3.5), 400, ["less than or equal to 2"], "temperature", None),
    "top_p zero": (chat(top_p=0), 400, ["top_p: Input should be greater than 0"], "top_p", None),
    "negative max_tokens": (chat(max_tokens=-5), 400, ["greater than or equal to 1", "-5"], "max_tokens", None),
    "huge max_tokens": (chat(max_tokens=10**9), 400, ["max_tokens=1000000000", "64"], "max_tokens", None),
    "empty messages": (chat(messages=[]), 400, ["messages", "at least 1"], "messages", None),
    "unknown role": (chat(messages=[{"role": "robot", "content": "x"}]), 400, ["robot"], "messages.0.role", None),
    "unknown model": (chat(model="gpt-5"), 404, ["'gpt-5' does not exist", "tiny-chat"], "model", "model_not_found"),
    "oversized prompt": (
        chat(messages=[{"role": "user", "content": "word " * 200}]),
        400,
        ["at most 32", "--max-prompt-tokens"],
        "messages",
        "context_length_exceeded",
    ),
    "missing field": ({"model": "tiny-chat"}, 400, ["messages: Field required"], "messages", None),
    "top_logprobs too many": (
        chat(logprobs=True, top_logprobs=21),
        400,
        ["top_logprobs: Input should be less than or equal to 20"],
        "top_logprobs",
        None,
    ),
    "top_logprobs without logprobs": (
        chat(top_logprobs=2),
        400,
        ["top_logprobs=2 needs logprobs=true"],
        "top_logprobs",
        None,
    ),
    "top_logprobs with logprobs false": (
        chat(logprobs=False, top_logprobs=0),
        400,
        ["top_logprobs=0 needs logprobs=true"],
        "top_logprobs",
        None,
    ),
    "too many choices": (chat(n=9), 400, ["n: Input should be less than or equal to 8"], "n", None),
    "seed out of range": (chat(seed=2**70), 400, ["seed: Input should be less than"], "seed", None),
    # types are strict: no boolean is a number, no string a number or a boolean
    "max_tokens boolean": (
        chat(max_tokens=True),
        400,
        ["max_tokens: Input should be a valid integer"],
        "max_tokens",
        None,
    ),
    "stream string": (chat(stream="yes"), 400, ["stream: Input should be a valid boolean"], "stream", None),
    "n string": (chat(n="2"), 400, ["n: Input should be a valid integer", '"2"'], "n", None),
    "temperature string": (
        chat(temperature="0.5"),
        400,
        ["temperature: Input should be a valid number"],
        "temperature",
        None,
    ),
    "top_k boolean": (chat(top_k=True), 400, ["top_k: Input should be a valid integer"], "top_k", None),
    "stop number": (chat(stop=5), 400, ["stop: Input should be a valid string"], "stop", None),
    "seed fraction": (chat(seed=1.5), 400, ["seed: Input should be a valid integer"], "seed", None),
    "logprobs number": (chat(logprobs=0), 400, ["logprobs: Input should be a valid boolean"], "logprobs", None),
    "include_usage string": (
        chat(stream=True, stream_options={"include_usage": "yes"}),
        400,
        ["stream_options.include_usage: Input should be a valid boolean"],
        "stream_options.include_usage",
        None,
    ),
    "best_of": (chat(best_of=100), 400, ["best_of=100 is not supported", "equal to n"], "best_of", None),
    # JSON can spell a lone surrogate ("\ud800"), which is not Unicode text
    "lone surrogate in content": (
        chat(messages=[{"role": "user", "content": "hi \ud800"}]),
        400,
        ["messages.0.content: contains invalid Unicode (a lone surrogate, U+D800"],
        "messages.0.content",
        None,
    ),
    "lone surrogate in a text part": (
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]),
        400,
        ["messages.0.content.0.text: contains invalid Unicode"],
        "messages.0.content.0.text",
        None,
    ),
    "lone surrogate in a stop string": (
        chat(stop=["ok", "\ud800"]),
        400,
        ["stop.1: contains invalid Unicode"],
        "stop.1",
        None,
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(guarded, case):
    payload, status, fragments, param, code = BAD_REQUESTS[case]
    assert_error(*guarded.post("/v1/chat/completions", payload, AUTH), status, *fragments, param=param, code=code)
    assert_still_serving(guarded, AUTH)


COMPLETION_BAD_REQUESTS = {
    "lone surrogate": ({"prompt": "\ud800"}, ["prompt: contains invalid Unicode (a lone surrogate, U+D800"], "prompt"),
    "lone surrogate in a list": ({"prompt": ["ok", "a\udfff"]}, ["prompt.1: contains invalid Unicode"], "prompt.1"),
    "max_tokens boolean": ({"max_tokens": True}, ["max_tokens: Input should be a valid integer"], "max_tokens"),
    "echo string": ({"echo": "yes"}, ["echo: Input should be a valid boolean"], "echo"),
    "best_of": ({"best_of": 3}, ["best_of=3 is not supported"], "best_of"),
    "logprobs boolean": ({"logprobs": True}, ["logprobs: Input should be a valid integer"], "logprobs"),
    "logprobs negative": ({"logprobs": -1}, ["logprobs: Input should be greater than or equal to 0"], "logprobs"),
    "logprobs too many": ({"logprobs": 6}, ["logprobs: Input should be less than or equal to 5"], "logprobs"),
    "logprobs with echo": ({"logprobs": 1, "echo": True}, ["logprobs with echo=true", "leave echo"], "logprobs"),
}


@pytest.mark.parametrize("case", COMPLETION_BAD_REQUESTS, ids=list(COMPLETION_BAD_REQUESTS))
def test_bad_completion_request_gets_a_clear_400(guarded, case):
    fields, fragments, param = COMPLETION_BAD_REQUESTS[case]
    payload = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 2, **fields}
    assert_error(*guarded.post("/v1/completions", payload, AUTH), 400, *fragments, param=param)
    assert_still_serving(guarded, AUTH)


def test_a_raw_utf8_surrogate_and_valid_best_of_and_logprobs(guarded):
    """Bytes that spell a surrogate in UTF-8 (ED A0 80) decode to one too; best_of equal to n is accepted;
    logprobs 0 reports each chosen token alone, logprobs false reports nothing (null), and logprobs true
    without top_logprobs reports no alternatives."""
    body = b'{"model": "tiny-chat", "prompt": "\xed\xa0\x80", "max_tokens": 2}'
    status, reply = guarded.post("/v1/completions", body, AUTH)
    assert status == 400 and reply["error"]["param"] == "prompt", reply
    payload = {"model": "tiny-chat", "prompt": "hello", "max_tokens": 2, "n": 2, "best_of": 2, "logprobs": 0}
    status, reply = guarded.post("/v1/completions", payload, AUTH)
    assert status == 200 and len(reply["choices"]) == 2, reply
    for choice in reply["choices"]:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        assert all(
            list(top) == [token] for top, token in zip(logprobs["top_logprobs"], logprobs["tokens"], strict=True)
        )
    status, reply = guarded.post("/v1/chat/completions", chat(logprobs=False, temperature=1), AUTH)
    assert status == 200 and reply["choices"][0]["logprobs"] is None, reply
    status, reply = guarded.post("/v1/chat/completions", chat(logprobs=True, temperature=1), AUTH)
    assert status == 200 and all(t["top_logprobs"] == [] for t in reply["choices"][0]["logprobs"]["content"]), reply


def test_completion_prompt_of_wrong_type_and_too_long_are_rejected(guarded):
    status, body = guarded.post("/v1/completions", {"model": "tiny-chat", "prompt": 5}, AUTH)
    assert_error(status, body, 400, "prompt: Input should be a valid string", param="prompt")
    status, body = guarded.post("/v1/completions", {"model": "tiny-chat", "prompt": "x " * 100}, AUTH)
    assert_error(status, body, 400, "at most 32", param="prompt", code="context_length_exceeded")


@pytest.mark.parametrize(
    "headers, fragment",
    [
        ({}, "no API key given"),
        ({"Authorization": "Bearer wrong"}, "incorrect API key"),
        ({"Authorization": KEY}, "no API key given"),
    ],
    ids=["missing", "wrong", "not bearer"],
)
def test_missing_or_wrong_api_key_is_401(guarded, headers, fragment):
    assert_error(*guarded.post("/v1/chat/completions", chat(), headers), 401, fragment, code="invalid_api_key")
    assert_error(*guarded.get("/v1/models", headers), 401, fragment, code="invalid_api_key")
    assert guarded.get("/health")[0] == 200  # health and the playground need no key
    assert guarded.get("/")[0] == 200


def test_openai_client_raises_its_typed_errors(guarded):
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        good.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        good.completions.create(model="tiny-chat", prompt="x", max_tokens=65)
    assert good.completions.create(model="tiny-chat", prompt="x", max_tokens=3).usage.completion_tokens >= 1


def test_unknown_route_and_oversized_body_use_the_error_shape(guarded):
    assert_error(*guarded.get("/v1/nothing", AUTH), 404, "Not Found")
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    connection.putrequest("POST", "/v1/completions")  # announce 50 MB, send none: refused before reading
    for name, value in {**AUTH, "Content-Type": "application/json", "Content-Length": str(50 << 20)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert_error(response.status, json.loads(response.read()), 413, "52428800 bytes", "at most 4194304")
    connection.close()
    assert_still_serving(guarded, AUTH)


@pytest.fixture(scope="module")
def looping(start_server, variant):
    """A server whose chat template would loop 10^10 times."""
    server = start_server([str(variant(chat_template=LOOPING_TEMPLATE)), "--timeout", "120"])
    yield server
    server.stop()


def test_a_chat_template_that_loops_for_hours_is_a_prompt_500_and_the_server_stays_healthy(looping):
    start = time.monotonic()
    status, body = looping.post("/v1/chat/completions", chat())
    assert_error(status, body, 500, "chat template rendering exceeded 5 s", code="chat_template_error")
    assert body["error"]["type"] == "server_error"
    assert time.monotonic() - start < 30  # the template's 5 s budget, not the request's 120 s timeout
    wait_until_idle(looping)
    assert_still_serving(looping)


def long_request(server, max_tokens: int = LONG, stream: bool = False):
    payload = {"model": "tiny-chat", "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    return server.post("/v1/completions", payload)


def long_request_with_headers(server) -> tuple[int, dict, dict[str, str]]:
    """(status, parsed JSON, headers) of one long completion: `Server.request` drops the headers."""
    payload = {"model": "tiny-chat", "prompt": "go", "max_tokens": LONG, "ignore_eos": True}
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        server.url + "/v1/completions", body, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, headers = error.code, error.read(), error.headers
    return status, json.loads(raw), dict(headers)


def test_a_full_queue_answers_503_at_once_with_retry_after_and_the_server_stays_healthy(tight):
    barrier = threading.Barrier(6)
    answered: list[int] = []  # statuses in the order the answers arrived

    def send(_):
        barrier.wait(10)
        status, body, headers = long_request_with_headers(tight)
        answered.append(status)
        return status, body, headers

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    busy = [r for r in results if r[0] == 503]
    admitted = [r for r in results if r[0] != 503]
    assert len(busy) == 4 and len(admitted) == 2  # 1 running + 1 queued; the rest refused
    for status, body, headers in busy:
        assert_error(status, body, 503, "server is busy", "--concurrency + --queue-size", code="server_busy")
        assert headers.get("retry-after") == "1", headers
    assert all(status == 504 for status, _, _ in admitted)  # LONG tokens cannot finish in 2 s
    assert answered[:4] == [503] * 4  # refused at once: while the admitted requests still held the worker
    wait_until_idle(tight)
    assert_still_serving(tight)


def wait_until_idle(server, seconds: float = 60.0) -> None:
    """Poll /health until nothing runs or waits; `seconds` only keeps a broken server from hanging the test."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = server.get("/health")[1]
        if health["running"] == health["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the worker is still busy after {seconds} s: {health}")


def test_timeout_is_504_and_frees_the_worker(tight):
    status, body = long_request(tight)
    assert_error(status, body, 504, "did not finish within 2 s", "--timeout", code="timeout")
    wait_until_idle(tight)  # the cancelled generation stopped at its next step
    assert_still_serving(tight)  # the one worker is free again: a short request gets its 200, not a 504


def test_streamed_timeout_ends_the_stream_with_an_error_event(tight):
    client = openai.OpenAI(base_url=tight.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    received = []
    with pytest.raises(openai.APIError, match="did not finish within 2 s"):
        for chunk in client.completions.create(
            model="tiny-chat", prompt="go", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
        ):
            received.append(chunk)
    assert received  # text streamed before the deadline
    wait_until_idle(tight)
    assert_still_serving(tight)


def test_sigterm_lets_in_flight_requests_finish(start_server, checkpoint):
    server = start_server([str(checkpoint), "--concurrency", "2", "--timeout", "120"], log_level="info")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    options = dict(model="tiny-chat", prompt="go", max_tokens=600, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(client.completions.create, **options)
        stream = client.completions.create(stream=True, **options)
        chunks = [next(iter(stream))]  # the streamed request is under way
        server.process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        plain = plain.result(timeout=120)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 600
    server.process.wait(60)
    log = "".join(server.log)
    assert "shutting down" in log and "stopped" in log, log
    assert log.index("shutting down") < log.index("stopped")
