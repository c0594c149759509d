"""`lmforge serve` with continuous batching, through HTTP and the official `openai` client: concurrent streamed
and plain requests get the greedy text `lmforge.generate` gives each alone; a request over a KV slot is a
400 naming the limit; a hundred requests against a small queue get 200s or fast 503s and leave the server
healthy with every slot free; /metrics is valid Prometheus text."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from lmforge.commands.generate import load_model_and_tokenizer
from lmforge.generate import generate
from lmforge.serve.backend import ServedModel

SLOTS, QUEUE, PER_SLOT = 4, 4, 512
PROMPTS = ["A checkpoint holds", "Hi", "To be, or not to be, that is the question", "The slings", "of fortune", "go"]


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    args = ["--concurrency", str(SLOTS), "--queue-size", str(QUEUE), "--max-tokens-per-slot", str(PER_SLOT)]
    server = start_server([str(checkpoint), *args, "--timeout", "120", "--max-tokens-limit", "4000"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(checkpoint) -> ServedModel:
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), None)
    return ServedModel(model.eval(), tokenizer, checkpoint.name)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_alone(local: ServedModel, prompt: str, max_tokens: int) -> str:
    """The oracle: `generate` on this prompt alone, in process, with the server's end-of-sequence ids."""
    ids = torch.tensor([local.encode_prompt(prompt)])
    out = generate(
        local.model, ids, max_new_tokens=max_tokens, tokenizer=local.tokenizer, eos_token_id=local.eos_token_id
    )
    return out.texts[0]


def test_concurrent_streamed_and_plain_requests_get_their_greedy_text_alone(server, local, checkpoint):
    jobs = [(prompt, 6 + 5 * i, i % 2 == 0) for i, prompt in enumerate(PROMPTS)]  # (prompt, max_tokens, stream)

    def ask(job) -> str:
        prompt, max_tokens, stream = job
        options = dict(model=checkpoint.name, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
        if not stream:
            return client_of(server).completions.create(**options).choices[0].text
        return "".join(c.choices[0].text for c in client_of(server).completions.create(stream=True, **options))

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(ask, jobs))
    assert replies == [greedy_alone(local, prompt, max_tokens) for prompt, max_tokens, _ in jobs]


def test_a_request_over_a_kv_slot_is_a_400_naming_the_limit(server, checkpoint):
    with pytest.raises(openai.BadRequestError, match=r"a slot holds 512 \(--max-tokens-per-slot\)"):
        client_of(server).completions.create(model=checkpoint.name, prompt="go", max_tokens=PER_SLOT + 1)
    with pytest.raises(openai.BadRequestError, match=r"at most 4 at once \(--kv-slots\)"):
        client_of(server).completions.create(model=checkpoint.name, prompt="go", max_tokens=2, n=SLOTS + 1)


def test_a_hundred_concurrent_requests_get_200_or_a_fast_503_and_leave_the_server_healthy(server, checkpoint):
    barrier, answered, lock = threading.Barrier(100), [], threading.Lock()
    body = dict(model=checkpoint.name, prompt="go", max_tokens=100, ignore_eos=True)

    def send(_) -> int:
        barrier.wait(60)
        status, _ = server.post("/v1/completions", body)
        with lock:
            answered.append(status)
        return status

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(send, range(100)))
    assert set(statuses) <= {200, 503} and statuses.count(200) >= SLOTS and len(answered) == 100
    status, health = server.get("/health")
    assert status == 200 and health["running"] == health["waiting"] == health["kv_slots_used"] == 0, health


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{le="([0-9.e+-]+|\+Inf)"\})? (-?[0-9.e+-]+|\+Inf|NaN)$')
COMMENT = re.compile(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$")


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, str | None], float]]:
    """(type per metric, value per (sample name, le)), every line held to the text format's grammar."""
    types, samples = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        comment = COMMENT.match(line)
        if comment:
            if comment.group(1) == "TYPE":
                assert comment.group(3) in ("counter", "gauge", "histogram"), line
                types[comment.group(2)] = comment.group(3)
            continue
        sample = SAMPLE.match(line)
        assert sample, f"not a Prometheus sample line: {line!r}"
        samples[(sample.group(1), sample.group(3))] = float(sample.group(4))
    return types, samples


def test_metrics_are_prometheus_text_with_load_tokens_and_latency_histograms(server, checkpoint):
    before = parse_exposition(server.get("/metrics")[1])[1][("lmforge_generated_tokens_total", None)]
    reply = client_of(server).completions.create(
        model=checkpoint.name, prompt="go", max_tokens=9, extra_body={"ignore_eos": True}
    )
    status, text = server.get("/metrics")
    types, samples = parse_exposition(text)
    assert status == 200 and reply.usage.completion_tokens == 9
    assert types == {
        "lmforge_requests_running": "gauge",
        "lmforge_requests_waiting": "gauge",
        "lmforge_kv_slots_used": "gauge",
        "lmforge_kv_slots_total": "gauge",
        "lmforge_decode_graphs_compiled": "gauge",
        "lmforge_decode_graphs_pending": "gauge",
        "lmforge_generated_tokens_total": "counter",
        "lmforge_prompt_tokens_total": "counter",
        "lmforge_prefix_cache_hit_tokens_total": "counter",
        "lmforge_time_to_first_token_seconds": "histogram",
        "lmforge_inter_token_latency_seconds": "histogram",
    }
    assert samples[("lmforge_generated_tokens_total", None)] - before == 9
    assert samples[("lmforge_kv_slots_total", None)] == SLOTS and samples[("lmforge_kv_slots_used", None)] == 0
    assert samples[("lmforge_decode_graphs_compiled", None)] == samples[("lmforge_decode_graphs_pending", None)] == 0
    for histogram in ("lmforge_time_to_first_token_seconds", "lmforge_inter_token_latency_seconds"):
        buckets = [v for (name, le), v in samples.items() if name == f"{histogram}_bucket"]
        assert buckets == sorted(buckets) and buckets[-1] == samples[(f"{histogram}_count", None)] >= 1
        assert samples[(f"{histogram}_bucket", "+Inf")] == buckets[-1] and samples[(f"{histogram}_sum", None)] > 0


def test_a_request_without_max_tokens_gets_what_its_slot_leaves(server, local, checkpoint):
    ids = local.encode_prompt("To be, or not to be, that is the question. " * 200)[: PER_SLOT - 8]
    prompt = local.tokenizer.decode(ids)
    room = PER_SLOT - len(local.encode_prompt(prompt)) + 1
    assert room < 16  # below the completion default, and far below what the 4096-token context leaves
    body = dict(model=checkpoint.name, prompt=prompt, ignore_eos=True)
    status, reply = server.post("/v1/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] == room, reply
