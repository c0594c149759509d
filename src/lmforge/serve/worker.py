"""Runs generation jobs on worker threads, behind a bounded queue, with a deadline per job.

The event loop must never run the model: a forward pass blocks for milliseconds to seconds, and every
other connection (health checks, new requests, streams in progress) would wait. So each request becomes a
`Job` whose work (an iterator of events, e.g. one per decoded token) runs on one of `concurrency` worker
threads; the events travel back to the request's coroutine through an asyncio queue.

Admission is bounded: at most `concurrency` jobs run and `queue_size` wait. A request beyond that is
refused at once (`ServerBusy`, sent as 503) instead of piling up: under overload, answering "busy" quickly
keeps latency bounded for the requests already admitted. Each job has a deadline (`timeout` seconds from
admission, queueing included); when it passes, or when the client goes away, the job's `cancelled` event is
set and the work stops at its next step, freeing the thread.

`close()` (at server shutdown, after the HTTP server has let in-flight requests finish) lets the threads
finish the jobs they hold and joins them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

Work = Callable[[threading.Event], Iterator[Any]]


class ServerBusy(Exception):
    def __init__(self, running: int, waiting: int) -> None:
        super().__init__(f"{running} running, {waiting} waiting")
        self.running, self.waiting = running, waiting


class JobTimeout(Exception):
    pass


_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put_all(batch: list[tuple[Job, Any]]) -> None:
    for job, item in batch:
        job._events.put_nowait(item)


class Job:
    """One request's channel: the engine pushes events (from its own thread), the request's coroutine iterates
    `events()`. `cancelled` is set when the request leaves (client gone, deadline passed); the engine checks it
    at every step."""

    DONE = _DONE  # the event that ends a stream (`push_all`)

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.loop, self.deadline = loop, deadline
        self.cancelled = threading.Event()
        self._events: asyncio.Queue = asyncio.Queue()

    def run(self, work: Work) -> None:
        """Run `work` on the calling thread, pushing its events, then end the stream."""
        try:
            if not self.cancelled.is_set():
                for event in work(self.cancelled):
                    self.push(event)
                    if self.cancelled.is_set():
                        break
        except Exception as error:  # handed to the request, which turns it into an error response
            self.fail(error)
        finally:
            self.finish()

    def push(self, item: Any) -> None:
        """Hand one event to the request; callable from any thread."""
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def fail(self, error: BaseException) -> None:
        self.push(_Failure(error))

    def finish(self) -> None:
        self.push(_DONE)

    @staticmethod
    def push_all(events: list[tuple[Job, Any]]) -> None:
        """Hand events to several requests at once (a batching engine's step: one event per running request),
        waking each event loop once instead of once per event; `Job.DONE` ends a request's stream."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, item in events:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for job, _ in batch:
                    job.cancelled.set()

    async def events(self) -> AsyncIterator[Any]:
        """The work's events as they come; raises JobTimeout at the deadline and re-raises the work's error.
        Leaving the iteration early (client gone, timeout) cancels the work."""
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                if remaining > 0 and not self._events.empty():  # no timer (a task per wait_for) for what is here
                    item = self._events.get_nowait()
                else:
                    try:
                        item = await asyncio.wait_for(self._events.get(), max(remaining, 0.0))
                    except asyncio.TimeoutError:
                        raise JobTimeout from None
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.cancelled.set()


class GenerationWorker:
    """`concurrency` threads taking jobs from one queue; at most `concurrency + queue_size` jobs admitted."""

    def __init__(self, concurrency: int = 1, queue_size: int = 16, timeout: float = 300.0) -> None:
        if concurrency < 1 or queue_size < 0 or timeout <= 0:
            raise ValueError(
                f"concurrency={concurrency} must be >= 1, queue_size={queue_size} >= 0 and timeout={timeout} > 0"
            )
        self.concurrency, self.queue_size, self.timeout = concurrency, queue_size, timeout
        self._jobs: queue.SimpleQueue[tuple[Job, Work] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"lmforge-generate-{i}", daemon=True) for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._admitted - self._running

    def submit(self, work: Work) -> Job:
        """Admit a job or raise ServerBusy; call from the event loop."""
        with self._lock:
            if self._closed or self._admitted >= self.concurrency + self.queue_size:
                raise ServerBusy(self._running, self._admitted - self._running)
            self._admitted += 1
        job = Job(asyncio.get_running_loop(), time.monotonic() + self.timeout)
        self._jobs.put((job, work))
        return job

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, work = item
            with self._lock:
                self._running += 1
            try:
                job.run(work)
            finally:
                with self._lock:
                    self._running -= 1
                    self._admitted -= 1

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the threads finish the admitted ones, and join them."""
        with self._lock:
            self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)


class ThreadedEngine:
    """The engine for models the batching engine cannot drive (encoder-decoders): each request runs on its own
    `GenerationWorker` thread as one `lmforge.generate.stream` call, its prompts and choices batched."""

    def __init__(self, served: Any, concurrency: int = 1, queue_size: int = 16, timeout: float = 300.0) -> None:
        self.served = served
        self.worker = GenerationWorker(concurrency, queue_size, timeout)
        self.kv_slots_used, self.kv_slots = 0, 0  # no slot pool: each generation allocates its own cache

    @property
    def running(self) -> int:
        return self.worker.running

    @property
    def waiting(self) -> int:
        return self.worker.waiting

    def room(self, prompt_tokens: int) -> int:
        """No slot limits a generation here: only the model's context (`ServedModel.room`)."""
        return self.served.room(prompt_tokens)

    def submit(self, rows: list[list[int]], options: dict[str, Any]) -> Job:
        return self.worker.submit(self.served.work(rows, options))

    def close(self, timeout: float | None = None) -> None:
        self.worker.close(timeout)
