"""Continuous batching (`generate.batching`) against `generate` run on each sequence alone: sequences of
different lengths sharing decode steps in a KV slot pool, prefilled in chunks, joining when a slot frees, must
produce the tokens, texts and finish reasons each gets alone (greedy, and seeded sampling)."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from lmforge import build_model
from lmforge.commands.generate import ByteTokenizer
from lmforge.generate import batching, generate
from lmforge.generate.batching import (
    BatchedDecoder,
    KVSlotPool,
    PrefixCache,
    SequenceSampler,
    copy_prefix,
    supports_batching,
)

CONTEXT = 96  # the small models' context (conftest.make_small_model's default)
PROMPTS = [[5, 17, 40, 2, 99, 12, 7], [250, 3], list(range(30, 53)), [64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
MAX_NEW = [10, 18, 6, 14, 9]


def run_batched(
    model, samplers: list[SequenceSampler], n_slots: int, chunk: int, compile: bool | str = False
) -> list[str]:
    """Each sequence's text (its tokens go to `samplers`) when they are admitted as slots free, prefilled
    `chunk` tokens per step and decoded together (the serving engine's schedule, without its threads)."""
    decoder = BatchedDecoder(model, n_slots, CONTEXT, compile=compile)
    waiting, running = deque(range(len(samplers))), {}  # index -> [slot, length, last token]
    texts = [""] * len(samplers)
    while waiting or running:
        while waiting and decoder.pool.free:
            running[waiting.popleft()] = [decoder.pool.allocate(), 0, -1]
        started = [i for i, (_, _, last) in running.items() if last >= 0]
        if started:
            logits = decoder.decode(*([running[i][k] for i in started] for k in range(3)))
            for row, i in enumerate(started):
                running[i][1] += 1
                running[i][2] = samplers[i].choose(logits[row])
                texts[i] += samplers[i].advance(running[i][2])
        for i in [i for i, (_, _, last) in running.items() if last < 0][:1]:  # one chunk per step
            slot, length, _ = running[i]
            prompt = samplers[i].prompt
            logits = decoder.prefill(slot, prompt[length : length + chunk], length)
            running[i][1] = min(length + chunk, len(prompt))
            if running[i][1] == len(prompt):
                running[i][2] = samplers[i].choose(logits)
                texts[i] += samplers[i].advance(running[i][2])
        for i in [i for i in running if samplers[i].finish_reason is not None]:
            decoder.pool.release(running.pop(i)[0])
    assert decoder.pool.used == 0
    return texts


def alone_and_samplers(model, prompts, new) -> tuple[list[list[int]], list[SequenceSampler]]:
    """The oracle (each prompt's greedy tokens from `generate` alone) and a fresh greedy sampler per prompt."""
    alone = [
        generate(model, torch.tensor([p]), max_new_tokens=n, eos_token_id=[]).tokens[0].tolist()
        for p, n in zip(prompts, new, strict=True)
    ]
    samplers = [
        SequenceSampler(p, model.config, max_new_tokens=n, eos_token_id=[]) for p, n in zip(prompts, new, strict=True)
    ]
    return alone, samplers


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("n_slots, chunk", [(3, 4), (5, 64)])
def test_batched_greedy_decoding_matches_each_sequence_alone(family, n_slots, chunk, small_model):
    model = small_model(family)
    alone, samplers = alone_and_samplers(model, PROMPTS, MAX_NEW)
    run_batched(model, samplers, n_slots, chunk)
    assert [s.generated for s in samplers] == alone
    assert [s.finish_reason for s in samplers] == ["length"] * len(PROMPTS)


def test_seeded_sampling_draws_the_same_tokens_in_a_batch_as_alone(small_model):
    model = small_model("llama")
    options = dict(do_sample=True, temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2, eos_token_id=[])
    seeds = [0, 1, 2, 3, 4]
    alone = [
        generate(model, torch.tensor([p]), max_new_tokens=n, seed=s, **options).tokens[0].tolist()
        for p, n, s in zip(PROMPTS, MAX_NEW, seeds, strict=True)
    ]
    samplers = [
        SequenceSampler(p, model.config, max_new_tokens=n, seed=s, **options)
        for p, n, s in zip(PROMPTS, MAX_NEW, seeds, strict=True)
    ]
    run_batched(model, samplers, 3, 5)
    assert [s.generated for s in samplers] == alone


def test_end_of_sequence_and_stop_strings_end_a_sequence_with_the_text_generate_gives(small_model):
    model, tokenizer = small_model("gpt"), ByteTokenizer()
    free = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=12, eos_token_id=[]).tokens[0].tolist()
    eos, stop = free[4], tokenizer.decode(free[6:8])
    cases = [dict(eos_token_id=[eos]), dict(eos_token_id=[], stop_strings=[stop])]
    for options in cases:
        want = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=12, tokenizer=tokenizer, **options)
        sampler = SequenceSampler(PROMPTS[0], model.config, max_new_tokens=12, tokenizer=tokenizer, **options)
        other = SequenceSampler(PROMPTS[2], model.config, max_new_tokens=12, eos_token_id=[])
        text = run_batched(model, [other, sampler], 2, 8)[1]
        assert text == want.texts[0] and sampler.finish_reason == want.finish_reasons[0] == "stop"
        assert sampler.generated == want.tokens[0].tolist()


def test_slot_pool_hands_out_the_lowest_free_slot_and_refuses_when_full():
    pool = KVSlotPool(3, 8)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2] and pool.free == 0
    with pytest.raises(RuntimeError, match="all 3 KV slots are in use"):
        pool.allocate()
    pool.release(1)
    assert pool.used == 2 and pool.allocate() == 1


def test_only_decoder_only_causal_models_are_batched(small_model):
    assert supports_batching(small_model("gpt")) and supports_batching(small_model("llama"))
    torch.manual_seed(0)
    t5 = build_model("t5", n_layer=2, n_head=4, d_model=64, vocab_size=300, head_dim=16, d_ff=128)
    assert not supports_batching(t5)
    with pytest.raises(ValueError, match="decoder-only causal_lm"):
        BatchedDecoder(t5, 2, 16)


def test_prefix_cache_finds_the_longest_shared_block_and_forgets_the_least_recently_used():
    pool = KVSlotPool(n_slots=2, max_len=64)
    k, v = pool.layer(0, torch.zeros(1, 2, 1, 4))
    k[0] = torch.arange(64.0)[None, :, None]  # slot 0: position j holds j
    cache = PrefixCache(max_tokens=24, block=4)
    first = list(range(100, 118))  # 18 tokens: positions 0..15 cacheable (one token is always prefilled)
    cache.store(first, pool, slot=0)
    assert cache.held == 16
    hit, kv = cache.lookup(first[:9] + [7, 7, 7])  # shares 9 tokens: the 8 of two whole blocks count
    assert hit == 8
    copy_prefix(pool, 1, kv, hit)
    assert torch.equal(k[1, :, :8], k[0, :, :8]) and not k[1, :, 8:].any()
    assert cache.lookup([1, 2, 3, 4, 5, 6]) == (0, None)
    assert cache.lookup(first[:4])[0] == 0  # 4 tokens: 3 cacheable, no whole block
    cache.store(list(range(200, 213)), pool, slot=0)  # 12 more positions: 28 > 24, the older entry goes
    assert cache.held == 12 and cache.lookup(first)[0] == 0
    assert cache.lookup(list(range(200, 210)))[0] == 8
    assert PrefixCache(max_tokens=0).lookup(first) == (0, None)


# --- the compiled fixed-shape step ------------------------------------------------------------------------


@pytest.fixture
def uncompiled_fixed_step(monkeypatch):
    """The fixed-shape batched step run as plain Python: the code inductor compiles, minus the compile."""
    step = batching._fixed_decode_step
    calls = []

    def recorded(model, pool, tokens, positions, keys, extra):
        calls.append((tokens.shape[0], keys))
        return step(model, pool, tokens, positions, keys, extra)

    monkeypatch.setattr(batching, "_compiled_fixed_step", (recorded, recorded))
    return calls


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("n_slots, chunk", [(3, 4), (5, 64)])
def test_fixed_shape_batched_step_matches_each_sequence_alone(family, n_slots, chunk, uncompiled_fixed_step,
                                                               small_model):  # fmt: skip
    """Rows padded to a power of two, idle and still-prefilling slots fed a dummy token at the last position,
    keys padded to a bucket: the same greedy tokens as each sequence decoded alone."""
    model = small_model(family)
    alone, samplers = alone_and_samplers(model, PROMPTS, MAX_NEW)
    run_batched(model, samplers, n_slots, chunk, compile=True)
    assert [s.generated for s in samplers] == alone
    rows = {r for r, _ in uncompiled_fixed_step}
    assert rows <= {1, 2, 4, n_slots} and max(rows) > 1  # bucketed batch sizes, several sequences at once
    assert {k for _, k in uncompiled_fixed_step} == {64}  # every sequence ends before position 64


def test_fixed_shape_step_writes_a_slots_last_position_while_others_idle(uncompiled_fixed_step, small_model):
    """Slot 2 frees early and takes a prompt that fills the whole slot (prompt + new - 1 = max_len) while slot 3
    still decodes: during its prefill the step feeds slot 2 dummy tokens at the last position, which it later
    writes itself before reading. Every sequence gets the tokens it gets alone."""
    model = small_model("llama")
    prompts = [[9, 8, 7], [1, 2], [5, 6], [4, 4, 4], list(range(3, 83))]
    new = [30, 30, 2, 40, CONTEXT - 80 + 1]
    alone, samplers = alone_and_samplers(model, prompts, new)
    run_batched(model, samplers, 4, 8, compile=True)
    assert [s.generated for s in samplers] == alone
    assert (4, 64) in uncompiled_fixed_step and (4, CONTEXT) in uncompiled_fixed_step  # keys past 64: the slot


def test_warm_up_compiles_every_shape_on_idle_rows_and_leaves_the_sequences_alone(uncompiled_fixed_step, small_model):
    """`warm_up` runs each (rows, keys) shape once on idle rows: only each slot's last position is written,
    which no sequence reads before writing it."""
    model = small_model("llama")
    decoder = BatchedDecoder(model, 4, CONTEXT, compile=True, defer_compile=True)
    decoder.prefill(decoder.pool.allocate(), PROMPTS[2], 0)
    before = [(k.clone(), v.clone()) for k, v in decoder.pool.buffers.values()]
    shapes = [(r, k) for r in (1, 2, 4) for k in (64, CONTEXT)]
    assert decoder.shapes(70) == shapes and decoder.shapes(10) == [(1, 64), (2, 64), (4, 64)]
    assert decoder.warm_up(70) == 6 and uncompiled_fixed_step == shapes and decoder.ready == set(shapes)
    for (k0, v0), (k1, v1) in zip(before, decoder.pool.buffers.values(), strict=True):
        assert torch.equal(k0[:, :, :-1], k1[:, :, :-1]) and torch.equal(v0[:, :, :-1], v1[:, :, :-1])
    assert decoder.warm_up(70) == 0  # nothing left to compile


def test_deferred_compiling_decodes_a_new_shape_eagerly_until_compile_pending(uncompiled_fixed_step, small_model):
    model = small_model("llama")
    decoder = BatchedDecoder(model, 4, CONTEXT, compile=True, defer_compile=True)
    slot = decoder.pool.allocate()
    logits = decoder.prefill(slot, PROMPTS[0], 0)
    token = int(logits.argmax())
    eager = decoder.decode([slot], [len(PROMPTS[0])], [token])
    assert not uncompiled_fixed_step and decoder.pending == {(1, 64)}
    assert decoder.compile_pending() and not decoder.compile_pending()
    assert uncompiled_fixed_step == [(1, 64)] and decoder.ready == {(1, 64)}
    compiled = decoder.decode([slot], [len(PROMPTS[0])], [token])  # the same step again, through the graph
    assert uncompiled_fixed_step == [(1, 64), (1, 64)]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_deferred_compile_that_fails_leaves_the_decoder_eager(monkeypatch, small_model):
    """A server's idle-time compile that fails: under "auto" a warning, asked for (True) the error, once; then
    the decoder decodes eagerly and stops trying."""
    from lmforge.generate import compiled

    attempts = []

    def no_compiler(*args):
        attempts.append(1)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(batching, "_compiled_fixed_step", (no_compiler, no_compiler))
    monkeypatch.setattr(compiled, "COMPILE_MIN_PARAMETERS", 1000)
    monkeypatch.setattr(compiled, "AUTO_COMPILE", {"cpu": (frozenset(),)})
    model = small_model("gpt")
    for compile in ("auto", True):
        decoder = BatchedDecoder(model, 2, CONTEXT, compile=compile, defer_compile=True)
        slot = decoder.pool.allocate()
        token = int(decoder.prefill(slot, PROMPTS[0], 0).argmax())
        decoder.decode([slot], [len(PROMPTS[0])], [token])
        if compile == "auto":
            with pytest.warns(UserWarning, match="did not compile.*no C.. compiler"):
                decoder.compile_pending()
        else:
            with pytest.raises(RuntimeError, match="no C.. compiler"):
                decoder.compile_pending()
        assert not decoder.compiled and decoder.warm_up(100) == 0
        decoder.decode([slot], [len(PROMPTS[0]) + 1], [token])  # eager, no new attempt
        assert not decoder.pending and not decoder.compile_pending()
    assert len(attempts) == 2


def test_batched_decoder_compile_auto_falls_back_to_eager_and_true_raises(monkeypatch, small_model):
    from lmforge.generate import compiled

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(batching, "_compiled_fixed_step", (no_compiler, no_compiler))
    monkeypatch.setattr(compiled, "COMPILE_MIN_PARAMETERS", 1000)
    monkeypatch.setattr(compiled, "AUTO_COMPILE", {"cpu": (frozenset(),)})
    model = small_model("gpt")
    assert not BatchedDecoder(model, 2, CONTEXT).compiled  # the default: eager
    expected = [generate(model, torch.tensor([p]), max_new_tokens=4, eos_token_id=[]).tokens[0].tolist()
                for p in PROMPTS[:2]]  # fmt: skip
    samplers = [SequenceSampler(p, model.config, max_new_tokens=4, eos_token_id=[]) for p in PROMPTS[:2]]
    with pytest.warns(UserWarning, match="batched decode step did not compile.*no C.. compiler"):
        run_batched(model, samplers, 2, 64, compile="auto")
    assert [s.generated for s in samplers] == expected
    samplers = [SequenceSampler(p, model.config, max_new_tokens=4, eos_token_id=[]) for p in PROMPTS[:2]]
    with pytest.raises(RuntimeError, match="no C.. compiler"):  # asked for: the error is the user's to see
        run_batched(model, samplers, 2, 64, compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama-int8"])
def test_inductor_compiled_batched_step_matches_eager_without_recompiling(family, small_model):
    from lmforge.nn.quant import quantize_int8

    model = small_model(family.removesuffix("-int8"))
    model = quantize_int8(model) if family.endswith("-int8") else model

    def texts(compile):
        samplers = [
            SequenceSampler(p, model.config, max_new_tokens=n, eos_token_id=[])
            for p, n in zip(PROMPTS, MAX_NEW, strict=True)
        ]
        run_batched(model, samplers, 4, 64, compile=compile)
        return [s.generated for s in samplers]

    eager = texts(False)
    assert texts(True) == eager
    with torch._dynamo.config.patch(error_on_recompile=True):  # the same schedule again: every graph is reused
        assert texts(True) == eager


@pytest.mark.slow
def test_inductor_compiled_bf16_step_on_pair_copies_matches_the_eager_step(small_model):
    """bf16 prepared for a server's rows: the graph runs `pairs_linear` on the pair-interleaved copies. Fed the
    same tokens, each compiled step's logits are the eager step's to bf16 rounding (inductor fuses the norms and
    adds in fp32 where eager rounds each op to bf16, so greedy paths of a random model can part at near-ties)."""
    from lmforge.generate import prepare_for_decoding
    from lmforge.nn.kernels import kernel_fast
    from lmforge.nn.quant import MatvecLinear

    if not kernel_fast("pairs"):
        pytest.skip("this CPU lacks AVX512-BF16: no pair-interleaved copies to compile")
    model = prepare_for_decoding(small_model("llama").to(torch.bfloat16), rows=8)
    assert all(m.packed is not None for m in model.modules() if isinstance(m, MatvecLinear))
    eager, compiled = BatchedDecoder(model, 4, CONTEXT), BatchedDecoder(model, 4, CONTEXT, compile=True)
    lengths, tokens = [], []
    for prompt in PROMPTS[:4]:
        for decoder in (eager, compiled):
            logits = decoder.prefill(decoder.pool.allocate(), prompt, 0)
        lengths.append(len(prompt))
        tokens.append(int(logits.argmax()))
    for _ in range(8):
        expected = eager.decode([0, 1, 2, 3], lengths, tokens)
        got = compiled.decode([0, 1, 2, 3], lengths, tokens)
        assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
        lengths, tokens = [n + 1 for n in lengths], expected.argmax(-1).tolist()
    assert compiled.ready == {(4, 64)}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_prefill_rows_pads_chunks_of_different_lengths_without_changing_any_row(family, small_model):
    """Rows prefilled together (slots out of order, chunks of 3, 7 and 1 tokens after a common start) get the
    logits and K/V each gets prefilled alone; then decoding over the padded positions gives the same tokens."""
    model = small_model(family)
    prompts = [[5, 17, 40, 2, 9, 12, 7, 8], [250, 3, 11, 4, 6, 30, 31, 32, 33, 34, 35, 36], [64, 2, 3, 4, 5]]
    start = 4
    together, apart = BatchedDecoder(model, 4, CONTEXT), BatchedDecoder(model, 4, CONTEXT)
    slots = [3, 0, 2]
    for decoder in (together, apart):
        for slot, p in zip(slots, prompts, strict=True):
            decoder.prefill(slot, p[:start], 0)
    rows = together.prefill_rows(slots, [p[start:] for p in prompts], start)
    alone_rows = [apart.prefill(slot, p[start:], start) for slot, p in zip(slots, prompts, strict=True)]
    torch.testing.assert_close(rows, torch.stack(alone_rows), rtol=1e-4, atol=1e-5)
    for layer, (k, v) in together.pool.buffers.items():
        for slot, p in zip(slots, prompts, strict=True):
            torch.testing.assert_close(k[slot, :, : len(p)], apart.pool.buffers[layer][0][slot, :, : len(p)])
            torch.testing.assert_close(v[slot, :, : len(p)], apart.pool.buffers[layer][1][slot, :, : len(p)])
    tokens = {d: [[int(r.argmax())] for r in out] for d, out in ((together, rows), (apart, torch.stack(alone_rows)))}
    for decoder, chosen in tokens.items():
        lengths = [len(p) for p in prompts]
        for _ in range(6):
            logits = decoder.decode(slots, lengths, [c[-1] for c in chosen])
            for row, c in enumerate(chosen):
                c.append(int(logits[row].argmax()))
            lengths = [n + 1 for n in lengths]
    assert tokens[together] == tokens[apart]
