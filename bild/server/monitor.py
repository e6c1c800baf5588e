"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..metrics import Stats

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LENGTHS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20)


class Monitor:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bild_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.cancelled = Counter("bild_cancelled", "generations stopped because the client went away", registry=r)
        self.tokens = Counter("bild_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("bild_prompt_tokens", "prompt tokens processed", registry=r)
        self.big_calls = Counter("bild_big_calls", "big-model forward passes after the prompt", registry=r)
        self.little_calls = Counter("bild_little_calls", "little-model forward passes after the prompt", registry=r)
        self.fallbacks = Counter("bild_fallbacks", "little model handed over to the big model", registry=r)
        self.rollbacks = Counter("bild_rollbacks", "little tokens replaced by the big model's", registry=r)
        self.accepted = Histogram("bild_acceptance_length", "little tokens kept per big call", buckets=LENGTHS,
                                  registry=r)
        self.queue_seconds = Histogram("bild_queue_seconds", "time from arrival to the start of generation",
                                       buckets=SECONDS, registry=r)
        self.latency = Histogram("bild_request_seconds", "time from arrival to the last token", buckets=SECONDS,
                                 registry=r)
        self.queued = Gauge("bild_queue_depth", "requests waiting for the worker", registry=r)
        self.busy = Gauge("bild_busy", "1 while the worker is generating", registry=r)

    def watch(self, worker) -> None:
        self.queued.set_function(lambda: worker.queued)
        self.busy.set_function(lambda: int(worker.busy))

    def record(self, stats: Stats, latency: float) -> None:
        """A finished generation."""
        self.tokens.inc(stats.new_tokens)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.big_calls.inc(stats.big_calls)
        self.little_calls.inc(stats.little_calls)
        self.fallbacks.inc(stats.fallbacks)
        self.rollbacks.inc(stats.rollbacks)
        for kept in stats.accepted:
            self.accepted.observe(kept)
        self.latency.observe(latency)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
