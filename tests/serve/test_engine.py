"""The batching engine in process: concurrent requests, admitted into a small KV slot pool and prefilled in
small chunks, each get the text and finish reason `lmforge.generate` gives them alone (greedy, a stop string,
a seed); a request whose client leaves is dropped and frees its slot; admission refuses what cannot fit."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmforge.commands.generate import load_model_and_tokenizer
from lmforge.generate import batching, generate
from lmforge.serve.backend import ServedModel
from lmforge.serve.engine import BatchingEngine
from lmforge.serve.errors import APIError
from lmforge.serve.schemas import CompletionRequest
from lmforge.serve.worker import ServerBusy

PROMPTS = [
    "A checkpoint holds",
    "Hi",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows",
    "of outrageous fortune",
]


@pytest.fixture(scope="module")
def served(checkpoint) -> ServedModel:
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), None)
    return ServedModel(model.eval(), tokenizer, checkpoint.name, max_tokens_limit=4000)


def options(served: ServedModel, max_tokens: int, **fields) -> dict:
    """`stream` options exactly as the server builds them for a completion request with these fields."""
    request = CompletionRequest(model=served.name, prompt="unused", max_tokens=max_tokens, **fields)
    return served.sampling_options(request, max_tokens, [])


def alone(served: ServedModel, prompt: str, opts: dict) -> tuple[str, str]:
    """The oracle: `generate` on this prompt alone, in process."""
    ids = torch.tensor([served.encode_prompt(prompt)])
    out = generate(served.model, ids, tokenizer=served.tokenizer, **opts)
    return out.texts[0], out.finish_reasons[0]


async def collect(job) -> tuple[str, str, int]:
    """The request's text, finish reason and the number of steps that carried text or the finish."""
    text, reason, steps = "", None, 0
    async for step in job.events():
        text, reason, steps = text + step.deltas[0], step.finish_reasons[0], steps + 1
    return text, reason, steps


def engine_for(served: ServedModel, **settings) -> BatchingEngine:
    return BatchingEngine(served, **{"concurrency": 8, "queue_size": 8, "timeout": 120.0, **settings})


async def until_idle(engine: BatchingEngine, guard: float = 60.0) -> None:
    """Wait until nothing runs; `guard` only keeps a broken engine from hanging the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + guard
    while (engine.running or engine.waiting) and loop.time() < deadline:
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("compile", [False, True])
def test_concurrent_greedy_requests_each_get_what_they_get_alone(compile, served, monkeypatch):
    """Eager, and through the fixed-shape step `--compile` runs (here without inductor: the same Python code),
    every shape compiled before the first request (`--compile-warmup`)."""
    steps = []

    def fixed_step(model, pool, tokens, positions, keys, extra):
        if bool((positions < pool.max_len - 1).any()):  # a real step, not a warm-up run on idle rows
            steps.append(tokens.shape[0])
        return batching._fixed_decode_step(model, pool, tokens, positions, keys, extra)

    monkeypatch.setattr(batching, "_compiled_fixed_step", (fixed_step, fixed_step))
    fields = [dict(temperature=0.0)] * len(PROMPTS)
    fields[1] = dict(temperature=0.0, ignore_eos=True)
    max_tokens = [12, 30, 7, 20, 16]
    stop = alone(served, PROMPTS[3], options(served, 20, temperature=0.0))[0][4:6]
    fields[3] = dict(temperature=0.0, stop=[stop])
    requests = [options(served, n, **f) for n, f in zip(max_tokens, fields, strict=True)]
    expected = [alone(served, p, o) for p, o in zip(PROMPTS, requests, strict=True)]
    assert expected[3][1] == "stop" and stop not in expected[3][0]

    async def scenario():
        # two requests wait for a slot
        engine = engine_for(served, kv_slots=3, prefill_chunk=4, compile=compile, warmup_tokens=10_000)
        try:
            jobs = [engine.submit([served.encode_prompt(p)], o) for p, o in zip(PROMPTS, requests, strict=True)]
            results = await asyncio.gather(*map(collect, jobs))
            await until_idle(engine)
            return results, engine.kv_slots_used
        finally:
            engine.close(30)

    results, used = asyncio.run(scenario())
    assert [(text, reason) for text, reason, _ in results] == expected
    assert bool(steps) == compile and set(steps) <= {1, 2, 3}
    assert results[1][2] == 30  # streamed: one step per token (ignore_eos: all 30 of them)
    assert used == 0


def test_a_shape_not_compiled_yet_runs_eagerly_and_is_compiled_when_the_server_is_idle(served, monkeypatch):
    """Without a warm-up the first request decodes eagerly (no compile while it waits); once nothing runs the
    engine compiles the shapes it met, on idle rows, leaving the pool's sequences alone, and the same request
    then goes through the compiled step with the same text."""
    real, warm = [], []

    def fixed_step(model, pool, tokens, positions, keys, extra):
        idle = bool((positions == pool.max_len - 1).all())
        (warm if idle else real).append((tokens.shape[0], keys))
        return batching._fixed_decode_step(model, pool, tokens, positions, keys, extra)

    monkeypatch.setattr(batching, "_compiled_fixed_step", (fixed_step, fixed_step))
    request = options(served, 10, temperature=0.0, ignore_eos=True)
    expected = alone(served, PROMPTS[0], request)

    async def scenario():
        engine = engine_for(served, kv_slots=2, compile=True)
        try:
            first = await collect(engine.submit([served.encode_prompt(PROMPTS[0])], request))
            assert not real  # every step of the first request ran eagerly
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not engine.decoder.ready and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert engine.decoder.ready == {(1, 64)} and warm == [(1, 64)]
            assert engine.graphs_compiled == 1 and engine.graphs_pending == 0  # /metrics' gauges
            second = await collect(engine.submit([served.encode_prompt(PROMPTS[0])], request))
            return first, second
        finally:
            engine.close(30)

    first, second = asyncio.run(scenario())
    assert first[:2] == second[:2] == expected
    assert real and set(real) == {(1, 64)}


def test_with_a_warm_up_the_app_takes_requests_once_every_shape_is_compiled(served, monkeypatch):
    """`--compile-warmup`: the app's start-up (its lifespan) returns only after the engine thread has compiled
    the step for every batch size and keys bucket up to that many positions."""
    from types import SimpleNamespace

    from lmforge.serve.app import ServeSettings, lifespan

    compiled_shapes = []

    def fixed_step(model, pool, tokens, positions, keys, extra):
        compiled_shapes.append((tokens.shape[0], keys))
        return batching._fixed_decode_step(model, pool, tokens, positions, keys, extra)

    monkeypatch.setattr(batching, "_compiled_fixed_step", (fixed_step, fixed_step))
    settings = ServeSettings(concurrency=3, max_tokens_per_slot=256, compile=True, warmup_tokens=100)
    app = SimpleNamespace(state=SimpleNamespace(served=served, settings=settings))

    async def scenario():
        async with lifespan(app):
            worker = app.state.worker
            assert worker.ready.is_set() and worker.running == 0
            return set(worker.decoder.ready)

    expected = {(r, k) for r in (1, 2, 3) for k in (64, 128)}
    assert asyncio.run(scenario()) == expected and sorted(compiled_shapes) == sorted(expected)


def test_seeded_requests_sample_the_same_text_in_a_batch_as_alone(served):
    requests = [options(served, 14, temperature=1.0, top_p=0.9, top_k=50, seed=seed) for seed in range(len(PROMPTS))]
    expected = [alone(served, p, o) for p, o in zip(PROMPTS, requests, strict=True)]

    async def scenario():
        engine = engine_for(served, kv_slots=4, prefill_chunk=8)
        try:
            jobs = [engine.submit([served.encode_prompt(p)], o) for p, o in zip(PROMPTS, requests, strict=True)]
            return await asyncio.gather(*map(collect, jobs))
        finally:
            engine.close(30)

    assert [(text, reason) for text, reason, _ in asyncio.run(scenario())] == expected


def test_each_of_n_seeded_choices_samples_as_a_request_alone_with_seed_plus_its_index(served):
    ids = served.encode_prompt(PROMPTS[0])
    expected = [alone(served, PROMPTS[0], options(served, 10, temperature=1.0, seed=40 + j)) for j in range(3)]

    async def scenario():
        engine = engine_for(served, kv_slots=4, prefill_chunk=3)
        try:
            other = engine.submit([served.encode_prompt(PROMPTS[2])], options(served, 10, temperature=1.0))
            job = engine.submit([ids] * 3, options(served, 10, temperature=1.0, seed=40))
            texts, reasons = ["", "", ""], None
            async for step in job.events():
                texts, reasons = [t + d for t, d in zip(texts, step.deltas, strict=True)], step.finish_reasons
            await collect(other)
            return list(zip(texts, reasons, strict=True))
        finally:
            engine.close(30)

    assert asyncio.run(scenario()) == expected
    assert len({text for text, _ in expected}) == 3  # three different samples


def test_a_request_whose_client_leaves_is_dropped_and_frees_its_slot(served):
    async def scenario():
        engine = engine_for(served, kv_slots=2)
        try:
            endless = engine.submit([served.encode_prompt("go")], options(served, 3000, ignore_eos=True))
            events = endless.events()
            await events.__anext__()
            sampler = engine._running[0].sequences[0].sampler
            short = engine.submit([served.encode_prompt(PROMPTS[0])], options(served, 6, temperature=0.0))
            await events.aclose()  # the client leaves: the job is cancelled
            text, reason, _ = await collect(short)
            await until_idle(engine)
            return sampler, (text, reason), engine.running, engine.kv_slots_used
        finally:
            engine.close(30)

    sampler, reply, running, used = asyncio.run(scenario())
    assert sampler.finish_reason is None and len(sampler.generated) < 3000  # dropped, not run to the end
    assert running == used == 0
    assert reply == alone(served, PROMPTS[0], options(served, 6, temperature=0.0))


def test_admission_refuses_a_full_queue_and_requests_that_cannot_fit(served):
    async def scenario():
        engine = engine_for(served, concurrency=1, queue_size=1, kv_slots=2, max_tokens_per_slot=64)
        try:
            long = options(served, 40, ignore_eos=True)
            jobs = [engine.submit([served.encode_prompt("go")], long) for _ in range(2)]  # 1 running + 1 waiting
            with pytest.raises(ServerBusy):
                engine.submit([served.encode_prompt("go")], long)
            with pytest.raises(APIError, match=r"needs 3 sequences .* at most 2 at once \(--kv-slots\)"):
                engine.submit([served.encode_prompt("go")] * 3, options(served, 4))
            ids = served.encode_prompt(PROMPTS[2])
            with pytest.raises(APIError, match=r"a slot holds 64 \(--max-tokens-per-slot\)") as error:
                engine.submit([ids], options(served, 65 - len(ids) + 1))
            assert error.value.status == 400
            replies = [await collect(job) for job in jobs]
            fits = engine.submit([ids], options(served, 65 - len(ids), ignore_eos=True))  # exactly fills a slot
            return [*replies, await collect(fits)]
        finally:
            engine.close(30)

    assert [(reason, len(text) > 0) for text, reason, _ in asyncio.run(scenario())] == [("length", True)] * 3


def test_prompts_that_start_alike_copy_the_cached_prefix_and_get_what_they_get_alone(served):
    """A long shared start (a system prompt): the first request prefills it and stores it; the next ones copy
    its whole 32-token blocks into their slots, prefill only the rest, and decode the same greedy text."""
    shared = " ".join(PROMPTS) + " "
    prompts = [shared + p for p in PROMPTS[:3]]
    ids = [served.encode_prompt(p) for p in prompts]
    common = next(i for i, (a, b, c) in enumerate(zip(*ids, strict=False)) if not a == b == c)  # shared tokens
    opts = options(served, 10, temperature=0.0)
    expected = [alone(served, p, opts) for p in prompts]

    async def scenario(cache_tokens: int):
        engine = engine_for(served, kv_slots=2, prefill_chunk=16, prefix_cache_tokens=cache_tokens)
        try:
            first = await collect(engine.submit([ids[0]], opts))
            rest = await asyncio.gather(*(collect(engine.submit([row], opts)) for row in ids[1:]))
            return [first, *rest], engine.prefix_hit_tokens, engine.prompt_tokens
        finally:
            engine.close(30)

    results, hits, prompt_tokens = asyncio.run(scenario(cache_tokens=1024))
    assert [(text, reason) for text, reason, _ in results] == expected
    assert common >= 64 and hits == 2 * (common // 32 * 32) and prompt_tokens == sum(map(len, ids))
    assert asyncio.run(scenario(cache_tokens=0))[1] == 0


def test_a_burst_of_requests_is_prefilled_in_one_forward_and_each_gets_what_it_gets_alone(served):
    """Prompts of different lengths admitted together start at position 0: one padded forward prefills them
    all, and the padding changes nobody's tokens."""
    requests = [options(served, n, temperature=0.0, ignore_eos=True) for n in (9, 14, 5, 11, 7)]
    expected = [alone(served, p, o) for p, o in zip(PROMPTS, requests, strict=True)]
    lengths = {len(served.encode_prompt(p)) for p in PROMPTS}
    assert len(lengths) > 1
    widths = []
    hook = served.model.register_forward_pre_hook(lambda _m, args: widths.append(tuple(args[0].shape)))

    async def scenario():
        engine = engine_for(served, kv_slots=5, prefill_chunk=1024)
        try:
            with engine._lock:  # all five arrive before the engine's next step (the lock is reentrant)
                jobs = [engine.submit([served.encode_prompt(p)], o) for p, o in zip(PROMPTS, requests, strict=True)]
            return await asyncio.gather(*map(collect, jobs))
        finally:
            engine.close(30)

    try:
        results = asyncio.run(scenario())
    finally:
        hook.remove()
    assert [(text, reason) for text, reason, _ in results] == expected
    prefills = [shape for shape in widths if shape[1] > 1]
    assert prefills == [(5, max(lengths))]


def test_a_prompt_prefilled_up_to_where_a_cached_one_starts_is_prefilled_once(served):
    """In one step, B (no cache hit) is prefilled from 0 to exactly the position where A's cache hit ends, so
    both groups of the step have B's new length as a start: B must still run once and get its own text."""
    shared = " ".join(PROMPTS) + " "
    first, a = served.encode_prompt(shared + PROMPTS[1]), served.encode_prompt(shared + PROMPTS[0])
    common = next(i for i, (x, y) in enumerate(zip(first, a, strict=False)) if x != y)
    hit = min(common // 32 * 32, (len(a) - 1) // 32 * 32)
    b = list(reversed(a[:hit]))
    assert hit >= 32 and b[:32] != first[:32]
    opts = options(served, 8, temperature=0.0, ignore_eos=True)
    expected = []
    for row in (a, b):
        out = generate(served.model, torch.tensor([row]), tokenizer=served.tokenizer, **opts)
        expected.append((out.texts[0], out.finish_reasons[0]))

    async def scenario():
        engine = engine_for(served, kv_slots=2, prefill_chunk=4096, prefix_cache_tokens=4096)
        try:
            await collect(engine.submit([first], opts))
            with engine._lock:  # A and B start in the same step
                jobs = [engine.submit([row], opts) for row in (a, b)]
            return await asyncio.gather(*map(collect, jobs)), engine.prefix_hit_tokens
        finally:
            engine.close(30)

    results, hits = asyncio.run(scenario())
    assert hits == hit
    assert [(text, reason) for text, reason, _ in results] == expected
