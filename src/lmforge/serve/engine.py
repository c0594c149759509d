"""The batching engine: one thread owns the model and advances every running request by one token per step.

Threads that each run a request (`worker.GenerationWorker`) split the CPU between forwards of batch 1;
decoding is bound by streaming the weights, so one forward over B rows costs little more than one over a
single row. The engine's loop therefore does, at every step (`generate.batching` has the KV side):

1. drop the requests whose client left or whose deadline passed, freeing their KV slots at once;
2. admit waiting requests, first come first served, while fewer than `concurrency` run and the pool has a
   free slot for each of their sequences (a request sends one sequence per prompt and choice);
3. decode: one batched forward feeds every running sequence its last token and samples its next one;
4. prefill: up to `prefill_chunk` prompt tokens of the sequences admitted but not yet started, so a long
   prompt is spread over several steps instead of stalling the running ones; the chunks that start at the
   same position run in one forward (a burst of requests is prefilled together, not one by one), and a
   sequence whose prompt is in gets its first token from that forward and decodes from the next step on. A
   prompt that starts like one prefilled before (a shared system prompt) first copies those positions' K/V
   from the `PrefixCache`;
5. send each request touched a `Step` (its sequences' new text, finish reasons, token counts and, when asked,
   the log-probabilities of the tokens chosen this step) and let finished sequences go, freeing their slots.

Admission is bounded as before: at most `concurrency + queue_size` requests are admitted (running or
waiting for slots); the next one gets `ServerBusy` (503) at once. A request that could never run (more
sequences than slots, or a sequence longer than a slot) is refused with a 400 naming the limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.generate.batching import BatchedDecoder, PrefixCache, SequenceSampler, TokenLogprob, copy_prefix
from lmforge.serve.backend import ServedModel, Step
from lmforge.serve.errors import invalid
from lmforge.serve.worker import Job, ServerBusy

log = logging.getLogger("lmforge.serve")
DEFAULT_SLOT_TOKENS = 4096
"""Positions per KV slot unless --max-tokens-per-slot says otherwise (or the context is shorter): the pool is
allocated whole, slots x positions x layers x 2 x kv-heads x head-dim values, and a model with an 8192-token
context (SmolLM2) would otherwise hold 1.5 GB of fp32 KV for its 8 default slots before its first long prompt."""


@dataclass(eq=False)
class _Sequence:
    """One prompt row of a request: its sampler, its KV slot and how many positions the slot holds."""

    sampler: SequenceSampler
    slot: int = -1
    length: int = 0  # positions written in the slot
    last: int = -1  # the token to feed at the next decode step

    @property
    def prompt(self) -> list[int]:
        return self.sampler.prompt


@dataclass(eq=False)
class _Request:
    job: Job
    sequences: list[_Sequence]
    deltas: list[str] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # entries chosen since the last Step
    touched: bool = False

    def __post_init__(self) -> None:
        self.deltas = [""] * len(self.sequences)
        self.logprobs = [[] for _ in self.sequences]

    @property
    def done(self) -> bool:
        return all(s.sampler.finish_reason is not None for s in self.sequences)

    def step(self, just_finished: list[bool]) -> Step:
        reasons = [s.sampler.finish_reason for s in self.sequences]
        counts = [len(s.sampler.generated) for s in self.sequences]
        step = Step(self.deltas, reasons, just_finished, counts, self.logprobs)
        self.deltas, self.touched = [""] * len(self.sequences), False
        self.logprobs = [[] for _ in self.sequences]
        return step


def row_seed(options: dict[str, Any], row: int) -> int | None:
    """Sequence `row` of a seeded request samples with seed + row (mod 2^64): each of n choices is then
    reproducible whatever else the engine runs beside it (one generator shared by the rows would hand out
    its draws in an order that depends on the schedule), and choice 0 is what the request alone with n=1 gets."""
    seed = options.get("seed")
    return seed if seed is None or row == 0 else (seed + row) % 2**64


class BatchingEngine:
    """Continuous batching over `served`'s decoder-only model (see the module docstring).

    kv_slots: sequences decoding at once; max_tokens_per_slot: positions each slot holds (prompt + new
    tokens - 1), default the model's context up to DEFAULT_SLOT_TOKENS; concurrency: requests running at
    once; queue_size: requests admitted beyond those; timeout: seconds per request from admission;
    prefill_chunk: prompt tokens prefilled per step; prefix_cache_tokens: prompt positions whose K/V are kept
    for prompts that start alike (`PrefixCache`; 0: off); compile: the decode step through torch.compile
    (`BatchedDecoder`: True, False or "auto"); warmup_tokens: before the first request, compile the step for
    every batch size at slot lengths up to this many positions (0: none).

    A compiled server never makes a request wait on a compile it did not ask for: a step of a shape not
    compiled yet runs eagerly, and the engine compiles such shapes one by one when it has no requests
    (`BatchedDecoder(defer_compile=True)`; a request that arrives meanwhile waits for that one compile).
    """

    def __init__(
        self,
        served: ServedModel,
        concurrency: int = 8,
        queue_size: int = 16,
        timeout: float = 300.0,
        kv_slots: int | None = None,
        max_tokens_per_slot: int | None = None,
        prefill_chunk: int = 256,
        prefix_cache_tokens: int = 0,
        compile: bool | str = False,
        warmup_tokens: int = 0,
    ) -> None:
        if concurrency < 1 or queue_size < 0 or timeout <= 0 or prefill_chunk < 1:
            raise ValueError(
                f"concurrency={concurrency} must be >= 1, queue_size={queue_size} >= 0, timeout={timeout} > 0 "
                f"and prefill_chunk={prefill_chunk} >= 1"
            )
        self.served, self.concurrency, self.queue_size, self.timeout = served, concurrency, queue_size, timeout
        self.prefill_chunk = prefill_chunk
        capacity = max_tokens_per_slot or min(served.context or DEFAULT_SLOT_TOKENS, DEFAULT_SLOT_TOKENS)
        self.decoder = BatchedDecoder(
            served.model, kv_slots or concurrency, capacity, compile=compile, defer_compile=True
        )
        self.warmup_tokens = warmup_tokens
        self.ready = threading.Event()  # set once the warm-up is over (at once without one)
        self.pool = self.decoder.pool
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.prompt_tokens = self.prefix_hit_tokens = 0  # counters for /metrics
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    # --- the event loop's side -------------------------------------------------------------------------
    @property
    def graphs_compiled(self) -> int:
        return len(self.decoder.ready)

    @property
    def graphs_pending(self) -> int:
        return len(self.decoder.pending)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_slots(self) -> int:
        return self.pool.n_slots

    @property
    def kv_slots_used(self) -> int:
        return self.pool.used

    def room(self, prompt_tokens: int) -> int:
        """The most new tokens a slot leaves a prompt of this length: what a request without max_tokens gets."""
        return self.pool.max_len - prompt_tokens + 1

    def submit(self, rows: list[list[int]], options: dict[str, Any]) -> Job:
        """Admit a request (one sequence per row) or raise ServerBusy; a request that cannot fit is a 400."""
        max_new = options.get("max_new_tokens", 32)
        if len(rows) > self.pool.n_slots:
            raise invalid(
                f"this request needs {len(rows)} sequences (prompts x n) but the server decodes at most "
                f"{self.pool.n_slots} at once (--kv-slots); send fewer prompts or a smaller n",
                "n",
            )
        longest = max(map(len, rows))
        if longest + max_new - 1 > self.pool.max_len:
            raise invalid(
                f"the prompt ({longest} tokens) plus max_tokens={max_new} needs {longest + max_new - 1} KV positions "
                f"but a slot holds {self.pool.max_len} (--max-tokens-per-slot); shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        shared = dict(options, tokenizer=self.served.tokenizer, device=self.decoder.device)
        sequences = [
            _Sequence(SequenceSampler(row, self.served.model.config, **{**shared, "seed": row_seed(options, i)}))
            for i, row in enumerate(rows)
        ]
        with self._lock:
            admitted = len(self._running) + len(self._waiting)
            if self._closed or admitted >= self.concurrency + self.queue_size:
                raise ServerBusy(len(self._running), len(self._waiting))
            job = Job(asyncio.get_running_loop(), time.monotonic() + self.timeout)
            self._waiting.append(_Request(job, sequences))
            self._lock.notify()
        return job

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the admitted ones, and stop the loop."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

    # --- the engine's thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        self._warm_up()
        while True:
            with self._lock:
                self._drop_cancelled()
                self._admit()
                # nobody running or waiting: time to compile a shape that a step ran eagerly
                compile_now = not (self._running or self._waiting or self._closed) and bool(self.decoder.pending)
                if not self._running and not compile_now:
                    if self._closed and not self._waiting:
                        return
                    self._lock.wait(0.1 if self._waiting else None)
                    continue
                running = list(self._running)
            if compile_now:
                try:
                    self.decoder.compile_pending()
                except Exception:
                    log.exception("compiling a decode step failed")
                continue
            try:
                self._step(running)
            except Exception as error:  # a failed forward fails the requests in it; the engine goes on
                log.exception("generation step failed")
                with self._lock:
                    for request in running:
                        self._leave(request)
                        request.job.fail(error)
                        request.job.finish()

    def _warm_up(self) -> None:
        """Compile the decode step's shapes up to `warmup_tokens` positions, on this thread (the one that runs
        the model), then set `ready`."""
        try:
            shapes = self.decoder.shapes(self.warmup_tokens) if self.warmup_tokens and self.decoder.compiled else []
            if shapes:
                started = time.perf_counter()
                log.info(
                    "compiling the decode step for %d shapes before the first request (~1.5 min each the first "
                    "time on 2 CPU cores, seconds from the disk cache)", len(shapes)
                )  # fmt: skip
                compiled = self.decoder.warm_up(self.warmup_tokens)
                log.info("compiled %d decode steps in %.0f s", compiled, time.perf_counter() - started)
        except Exception:  # --compile was asked and failed: each step will say so to its requests
            log.exception("compiling the decode steps failed")
        finally:
            self.ready.set()

    def _drop_cancelled(self) -> None:
        for request in [r for r in (*self._running, *self._waiting) if r.job.cancelled.is_set()]:
            self._leave(request)
            request.job.finish()

    def _leave(self, request: _Request) -> None:
        """Take the request out of the engine and give its slots back."""
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        for sequence in request.sequences:
            if sequence.slot >= 0:
                self.pool.release(sequence.slot)
                sequence.slot = -1

    def _admit(self) -> None:
        while (
            self._waiting
            and len(self._running) < self.concurrency
            and self.pool.free >= len(self._waiting[0].sequences)
        ):
            request = self._waiting.popleft()
            for sequence in request.sequences:
                sequence.slot = self.pool.allocate()
            self._running.append(request)

    def _step(self, running: list[_Request]) -> None:
        """One decode forward over the started sequences, then one prefill budget over the others."""
        finished: dict[_Request, list[bool]] = {r: [False] * len(r.sequences) for r in running}
        decoding = [
            (r, i, s)
            for r in running
            for i, s in enumerate(r.sequences)
            if s.last >= 0 and s.sampler.finish_reason is None
        ]
        if decoding:
            logits = self.decoder.decode(
                [s.slot for _, _, s in decoding], [s.length for _, _, s in decoding], [s.last for _, _, s in decoding]
            )
            for row, (request, i, sequence) in enumerate(decoding):
                sequence.length += 1
                finished[request][i] = self._sample(request, i, sequence, logits[row])
        budget, work = self.prefill_chunk, []
        for request in running:
            for i, sequence in enumerate(request.sequences):
                if budget == 0:
                    break
                if sequence.last >= 0:
                    continue
                if sequence.length == 0:  # starting: take what the prefix cache holds of this prompt
                    hit, kv = self.prefix.lookup(sequence.prompt)
                    if kv is not None:
                        copy_prefix(self.pool, sequence.slot, kv, hit)
                        sequence.length = hit
                    self.prompt_tokens += len(sequence.prompt)
                    self.prefix_hit_tokens += hit
                chunk = sequence.prompt[sequence.length : sequence.length + budget]
                budget -= len(chunk)
                work.append((sequence.length, request, i, sequence, chunk))
        for start in sorted({w[0] for w in work}):  # one forward per start position, fixed before any runs
            group = [w[1:] for w in work if w[0] == start]
            logits = self.decoder.prefill_rows([s.slot for _, _, s, _ in group], [c for *_, c in group], start)
            for row, (request, i, sequence, chunk) in enumerate(group):
                sequence.length += len(chunk)
                if sequence.length == len(sequence.prompt):
                    self.prefix.store(sequence.prompt, self.pool, sequence.slot)
                    finished[request][i] = self._sample(request, i, sequence, logits[row])
        events = []  # handed over together: one wake-up of the server's event loop a step, not one a request
        with self._lock:
            for request in running:
                if request.touched:
                    events.append((request.job, request.step(finished[request])))
                for sequence in request.sequences:
                    if sequence.sampler.finish_reason is not None and sequence.slot >= 0:
                        self.pool.release(sequence.slot)
                        sequence.slot = -1
                if request.done and request in self._running:
                    self._running.remove(request)
                    events.append((request.job, Job.DONE))
        Job.push_all(events)

    def _sample(self, request: _Request, i: int, sequence: _Sequence, logits: torch.Tensor) -> bool:
        """Choose the sequence's next token from `logits`; whether it finished the sequence."""
        sampler = sequence.sampler
        recorded = len(sampler.token_logprobs)
        token = sampler.choose(logits)
        request.deltas[i] += sampler.advance(token)
        request.logprobs[i] += sampler.token_logprobs[recorded:]  # none for an end-of-sequence token
        request.touched = True
        sequence.last = token
        return sequence.sampler.finish_reason is not None
