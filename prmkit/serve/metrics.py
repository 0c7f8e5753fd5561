"""Prometheus metrics of a `prmkit serve` process (``GET /metrics``), in a registry of its own.

The mean batch is ``prmkit_batch_requests_sum / prmkit_batch_requests_count``: requests scored together in one engine
call (the engine cuts that call into forward batches of one padded width under its token budget).
"""

from __future__ import annotations

from typing import Any

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = tuple(2**k for k in range(6, 22))
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("prmkit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "prmkit_request_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("prmkit_rows", "Solutions scored", registry=r)
        self.steps = Counter("prmkit_steps", "Steps scored", registry=r)
        self.tokens = Counter("prmkit_tokens", "Tokens read by the model", registry=r)
        self.truncated = Counter("prmkit_truncated_rows", "Solutions cut by the model's max_length", registry=r)
        self.batch_requests = Histogram(
            "prmkit_batch_requests", "Requests scored together in one engine call", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "prmkit_batch_rows", "Solutions scored together in one engine call", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "prmkit_batch_tokens", "Tokens scored together in one engine call", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "prmkit_batch_seconds", "Seconds of one engine call", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_rows = Gauge("prmkit_queue_rows", "Solutions admitted and not yet being scored", registry=r)
        self.queue_requests = Gauge(
            "prmkit_queue_requests", "Requests tokenized and waiting for the engine", registry=r
        )
        self.in_flight = Gauge("prmkit_requests_in_flight", "Requests being answered", registry=r)
        self.errors = Counter("prmkit_errors", "Requests that failed, by reason", ["reason"], registry=r)
        self.ready = Gauge("prmkit_ready", "1 once the model is loaded and the server takes work", registry=r)

    # The batcher's hooks (prmkit.serve.batcher calls them from its threads; prometheus_client is thread-safe).

    def batch(self, requests: int, rows: int, tokens: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.batch_seconds.observe(seconds)

    def queue_depth(self, rows: int, requests: int) -> None:
        self.queue_rows.set(rows)
        self.queue_requests.set(requests)

    def rejected(self, reason: str) -> None:
        self.errors.labels(reason).inc()

    def error(self, reason: str) -> None:
        self.errors.labels(reason).inc()

    def scored(self, results: Any) -> None:
        for r in results:
            self.rows.inc()
            self.steps.inc(len(r.scores))
            self.tokens.inc(r.num_tokens)
            if r.truncated:
                self.truncated.inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
