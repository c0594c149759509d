"""`GET /metrics`: the server's load and latencies in Prometheus' text exposition format (version 0.0.4).

Gauges are read from the engine when scraped (requests running and waiting, KV slots used and held); the
routes record the rest as requests stream: generated tokens (a counter), time to first token (from
admission to the first step that produced a token: queueing and prefill) and inter-token latency (between
consecutive steps of one request), both histograms with cumulative `le` buckets, as vLLM and TGI expose them.
`prometheus_client` is not a dependency: the format is a few lines of text.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Observations counted into buckets (upper bounds `buckets`, then +Inf), with their sum and count."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        return [*lines, f"{self.name}_sum {total!r}", f"{self.name}_count {cumulative}"]


class ServerMetrics:
    """What the routes record; `render(engine)` adds the engine's gauges and returns the exposition text."""

    def __init__(self) -> None:
        self.generated_tokens = 0
        self._lock = threading.Lock()
        self.time_to_first_token = Histogram(
            "lmforge_time_to_first_token_seconds", "Seconds from admission to a request's first token.", TTFT_BUCKETS
        )
        self.inter_token_latency = Histogram(
            "lmforge_inter_token_latency_seconds", "Seconds between consecutive steps of a request.", ITL_BUCKETS
        )

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.generated_tokens += n

    def render(self, engine) -> str:
        gauges = [
            ("lmforge_requests_running", "Requests decoding now.", engine.running),
            ("lmforge_requests_waiting", "Requests admitted and waiting for KV slots.", engine.waiting),
            ("lmforge_kv_slots_used", "KV cache slots held by running sequences.", engine.kv_slots_used),
            ("lmforge_kv_slots_total", "KV cache slots in the pool (--kv-slots).", engine.kv_slots),
            (
                "lmforge_decode_graphs_compiled",
                "Decode step shapes (rows x keys) compiled; other shapes run eagerly.",
                getattr(engine, "graphs_compiled", 0),
            ),
            (
                "lmforge_decode_graphs_pending",
                "Shapes met eagerly and waiting to be compiled when the server is idle.",
                getattr(engine, "graphs_pending", 0),
            ),
        ]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        counters = [
            ("lmforge_generated_tokens_total", "Tokens generated.", self.generated_tokens),
            ("lmforge_prompt_tokens_total", "Prompt tokens of started sequences.", getattr(engine, "prompt_tokens", 0)),
            (
                "lmforge_prefix_cache_hit_tokens_total",
                "Prompt tokens whose K/V came from the prefix cache instead of a prefill.",
                getattr(engine, "prefix_hit_tokens", 0),
            ),
        ]
        for name, help, value in counters:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += self.time_to_first_token.render() + self.inter_token_latency.render()
        return "\n".join(lines) + "\n"
