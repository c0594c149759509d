"""Log-probabilities, from the sampler to the official `openai` client.

The oracle is the model itself: a teacher-forced forward over prompt + generated tokens, computed here,
whose log-softmax must equal what the sampler, the batching engine and the server report (to 1e-4: a cached,
batched decode rounds differently from one full forward). The reported values are those of the raw logits,
whatever temperature, top-k or penalties chose the token; an end-of-sequence token that ends a sequence is
not reported; the server answers both OpenAI shapes, streamed and not; the threaded path refuses logprobs."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from lmforge.commands.generate import load_model_and_tokenizer
from lmforge.generate import generate
from lmforge.generate.batching import SequenceSampler, TokenLogprob
from lmforge.models import build_model
from lmforge.serve.backend import ServedModel
from lmforge.serve.engine import BatchingEngine
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import CompletionRequest
from lmforge.serve.worker import ThreadedEngine

TOLERANCE = 1e-4
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def served(checkpoint) -> ServedModel:
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), None)
    return ServedModel(model.eval(), tokenizer, checkpoint.name, max_tokens_limit=4000)


@pytest.fixture(scope="module")
def server(start_server, checkpoint):
    server = start_server([str(checkpoint), "--kv-slots", "4", "--timeout", "120", "--max-tokens-limit", "4000"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def teacher_forced(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The oracle: log-softmax (len(generated), V) of the model's next-token logits at each generated token,
    from one forward over prompt + generated."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


def assert_entries_match(model, prompt: list[int], entries: list[TokenLogprob], k: int) -> None:
    expected = teacher_forced(model, prompt, [e.token for e in entries])
    for entry, row in zip(entries, expected, strict=True):
        assert abs(entry.logprob - float(row[entry.token])) < TOLERANCE
        top = torch.topk(row, k)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in entry.top]), top.values, atol=TOLERANCE)


def greedy_ids(served: ServedModel, prompt: list[int], max_tokens: int, stops: list[str] = ()) -> list[int]:
    """The tokens the server returns for this prompt at temperature 0: `generate`'s, up to end-of-sequence."""
    out = generate(
        served.model,
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        tokenizer=served.tokenizer,
        eos_token_id=served.eos_token_id,
        stop_strings=list(stops),
    )
    eos = set(served.eos_token_id or ())
    ids = out.tokens[0].tolist()
    return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]


# --- the sampler ------------------------------------------------------------------------------------------
def test_sampler_reports_the_raw_distribution_whatever_chose_the_token():
    torch.manual_seed(0)
    logits = torch.randn(40) * 3
    raw = torch.log_softmax(logits, dim=-1)
    sampler = SequenceSampler(
        [1, 2, 3],
        None,
        do_sample=True,
        temperature=0.3,
        top_k=4,
        repetition_penalty=1.5,
        frequency_penalty=1.0,
        seed=0,
        eos_token_id=[],
        logprobs=5,
    )
    for _ in range(3):
        token = sampler.choose(logits)
        sampler.advance(token)
    assert [e.token for e in sampler.token_logprobs] == sampler.generated
    for entry in sampler.token_logprobs:
        assert entry.logprob == pytest.approx(float(raw[entry.token]), abs=1e-6)
        assert [t for t, _ in entry.top] == torch.topk(raw, 5).indices.tolist()


def test_an_end_of_sequence_token_that_ends_the_sequence_is_not_reported():
    logits = torch.zeros(10)
    logits[7], logits[3] = 5.0, 4.0
    sampler = SequenceSampler([1], None, eos_token_id=[3], logprobs=0, max_new_tokens=5)
    sampler.advance(sampler.choose(logits))  # 7: greedy
    logits[3] = 6.0
    sampler.advance(sampler.choose(logits))  # 3: end of sequence
    assert sampler.generated == [7, 3] and sampler.finish_reason == "stop"
    assert [(e.token, e.top) for e in sampler.token_logprobs] == [(7, [])]
    assert SequenceSampler([1], None, eos_token_id=[3]).token_logprobs == []  # off by default
    with pytest.raises(ValueError, match="logprobs=-1 must be None"):
        SequenceSampler([1], None, eos_token_id=[3], logprobs=-1)


# --- the engine -------------------------------------------------------------------------------------------
def test_the_engine_reports_the_teacher_forced_logprobs_of_batched_greedy_and_sampled_sequences(served):
    """Three requests decode in one batch at different lengths (one with n=2, sampled hot and truncated):
    every reported entry is the raw log-softmax of the model's own forward."""
    prompts = [served.encode_prompt(p) for p in (PROMPT, "Hi", "The slings and arrows of outrageous fortune")]
    fields = [dict(temperature=0.0, logprobs=3), dict(temperature=1.5, top_k=5, seed=3, n=2, logprobs=2), {}]

    def options(f: dict) -> dict:
        f = {k: v for k, v in f.items() if k != "n"}
        request = CompletionRequest(model=served.name, prompt="unused", max_tokens=8, ignore_eos=True, **f)
        return served.sampling_options(request, 8, [])

    async def scenario() -> list[list[list[TokenLogprob]]]:
        engine = BatchingEngine(served, concurrency=4, queue_size=4, timeout=120.0, kv_slots=4, prefill_chunk=4)
        try:
            jobs = [engine.submit([p] * f.get("n", 1), options(f)) for p, f in zip(prompts, fields, strict=True)]
            results = []
            for job in jobs:
                entries = None
                async for step in job.events():
                    entries = [[] for _ in step.logprobs] if entries is None else entries
                    for row, new in zip(entries, step.logprobs, strict=True):
                        row.extend(new)
                results.append(entries)
            return results
        finally:
            engine.close(30)

    greedy, sampled, plain = asyncio.run(scenario())
    assert len(greedy[0]) == 8 and all(len(row) == 8 for row in sampled)
    assert plain == [[]]  # not asked: nothing recorded
    assert_entries_match(served.model, prompts[0], greedy[0], 3)
    assert all(e.top[0][0] == e.token for e in greedy[0])  # greedy chose the most likely token
    for row in sampled:
        assert_entries_match(served.model, prompts[1], row, 2)
    assert [e.token for e in sampled[0]] != [e.token for e in sampled[1]]  # two different samples


def test_the_threaded_path_refuses_logprobs_with_a_400(served):
    t5 = ServedModel(build_model("t5-tiny", n_layer=1), served.tokenizer, "t5")
    engine = ThreadedEngine(t5)
    try:
        with pytest.raises(APIError, match="logprobs are not supported for T5") as refused:
            engine.submit([[1, 2, 3]], {"max_new_tokens": 2, "logprobs": 0})
        assert (refused.value.status, refused.value.param) == (400, "logprobs")
        assert "leave logprobs and top_logprobs unset" in refused.value.message
    finally:
        engine.close(30)


# --- the server, through the openai client ----------------------------------------------------------------
def test_chat_logprobs_equal_the_teacher_forced_oracle_streamed_and_not(client, served):
    messages = [{"role": "user", "content": "What is a tokenizer?"}]
    prompt, stops = served.encode_chat(messages)
    expected_ids = greedy_ids(served, prompt, 6, stops)
    options = dict(model=served.name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**options)
    content = reply.choices[0].logprobs.content
    assert [t.token for t in content] == [served.token_text(i) for i in expected_ids]
    oracle = teacher_forced(served.model, prompt, expected_ids)
    for token, token_id, row in zip(content, expected_ids, oracle, strict=True):
        assert token.logprob == pytest.approx(float(row[token_id]), abs=TOLERANCE)
        assert token.bytes == list(token.token.encode("utf-8"))
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=TOLERANCE)
        top = torch.topk(row, 3)
        assert [t.logprob for t in token.top_logprobs] == pytest.approx(top.values.tolist(), abs=TOLERANCE)
    chunks = list(client.chat.completions.create(stream=True, **options))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=TOLERANCE)
    plain = client.chat.completions.create(**{**options, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_have_openais_legacy_shape_streamed_and_not(client, served):
    prompt = served.encode_prompt(PROMPT)
    expected_ids = greedy_ids(served, prompt, 6)
    options = dict(model=served.name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    choice = client.completions.create(**options).choices[0]
    logprobs = choice.logprobs
    assert logprobs.tokens == [served.token_text(i) for i in expected_ids]
    oracle = teacher_forced(served.model, prompt, expected_ids)
    expected = [float(row[i]) for row, i in zip(oracle, expected_ids, strict=True)]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=TOLERANCE)
    rows = zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
    for token, token_logprob, top in rows:
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(token_logprob, abs=TOLERANCE)  # k + the chosen
        assert max(top.values()) == pytest.approx(token_logprob, abs=TOLERANCE)  # greedy: the most likely
    lengths = [len(t) for t in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **options) if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.logprobs.tokens] == logprobs.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == logprobs.text_offset
    streamed = [lp for c in chunks for lp in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(logprobs.token_logprobs, abs=TOLERANCE)
