"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one
process, as in tests). Gauges read the scheduler when scraped; counters and histograms are fed
by the HTTP middleware and by the engine thread as events come out."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from ..scheduler import Event, Request, Scheduler

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, scheduler: Scheduler, max_slots: int, prefix: str = "llama_jax"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{prefix}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens",
                                     "Prompt tokens queued (a request with n choices counts n times)", registry=r)
        self.cached_prompt_tokens = Counter(f"{prefix}_cached_prompt_tokens",
                                            "Prompt tokens found in a slot's cache (prefix reuse), not prefilled",
                                            registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter(f"{prefix}_finished_requests", "Generation requests by finish reason",
                                ["reason"], registry=r)
        Gauge(f"{prefix}_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge(f"{prefix}_running_requests", "Requests holding a slot", registry=r).set_function(
            lambda: len(scheduler.running))
        Gauge(f"{prefix}_batch_occupancy", "Running slots / max slots", registry=r).set_function(
            lambda: len(scheduler.running) / max_slots)
        Gauge(f"{prefix}_max_slots", "Engine decode slots", registry=r).set(max_slots)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{prefix}_inter_token_latency_seconds",
                             "Time per generated token after the first, as delivered", buckets=_LATENCY_BUCKETS,
                             registry=r)
        # Counts the scheduler and engine keep themselves, read when scraped.
        counters = [(f"{prefix}_num_preemptions", "Running requests given back to the queue for higher priorities",
                     lambda: scheduler.preemptions)]
        engine = scheduler.engine
        if engine.speculation is not None:
            counters += [(f"{prefix}_spec_decode_draft_tokens", "Draft tokens verified", lambda: engine.drafted),
                         (f"{prefix}_spec_decode_accepted_tokens", "Draft tokens accepted (equal to the sampled token)",
                          lambda: engine.accepted)]
        r.register(_ReadCounters(counters))
        self._last: dict[str, float] = {}  # request id -> time of its previous event (engine thread only)

    def observe(self, req: Request, event: Event) -> None:
        """Called on the engine thread for every event of every request."""
        n = len(event.token_ids)
        if n:
            self.generation_tokens.inc(n)
            last = self._last.get(req.id)
            if last is None:
                self.cached_prompt_tokens.inc(event.cached_tokens)
                self.ttft.observe((req.first_token_time or event.time) - req.arrival)
                n -= 1  # the first token's latency is the TTFT
                last = req.first_token_time or event.time
            # Tokens of one decode dispatch arrive together: spread the gap over them.
            for _ in range(n):
                self.itl.observe((event.time - last) / n)
            self._last[req.id] = event.time
        if event.finish_reason is not None:
            self._last.pop(req.id, None)
            self.finished.labels(event.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReadCounters:
    """Counters whose values are read from a function each when scraped: (name, help, read)."""

    def __init__(self, counters: list[tuple[str, str, Callable[[], float]]]):
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text, read in self.counters:
            yield CounterMetricFamily(name, text, value=read())
