"""Prometheus metric objects (DESIGN.md §3), on a registry of our own.

A :class:`Metrics` instance per app (not module globals) so that two service instances in one
test process do not share counters; the hot path only touches pre-bound children.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "realign"

#: Sub-millisecond to tens of seconds: cache lookups sit at the bottom, cold batches at the top.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class Metrics:
    """All metrics of one service instance, registered on ``registry``."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        p = PREFIX
        self.requests_total = Counter(
            f"{p}_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.texts_total = Counter(f"{p}_texts", "Texts embedded (after validation).", registry=r)
        self.texts_truncated_total = Counter(
            f"{p}_texts_truncated", "Texts cut at the encoder's context length.", registry=r
        )
        self.tokens_total = Counter(f"{p}_tokens", "Real (unpadded) tokens encoded.", registry=r)
        self.cache_hits_total = Counter(
            f"{p}_cache_hits", "Texts served from the cache.", registry=r
        )
        self.cache_misses_total = Counter(
            f"{p}_cache_misses", "Texts not found in the cache.", registry=r
        )
        self.cache_errors_total = Counter(
            f"{p}_cache_errors", "Cache backend failures (treated as misses).", registry=r
        )
        self.dropped_total = Counter(
            f"{p}_dropped_texts", "Queued texts dropped because their client left.", registry=r
        )
        self.rejected_total = Counter(
            f"{p}_rejected_texts", "Texts refused at admission (queue full).", registry=r
        )
        self.batch_failures_total = Counter(
            f"{p}_batch_failures", "Batches whose encoder call raised.", registry=r
        )
        self.worker_restarts_total = Counter(
            f"{p}_worker_restarts", "Times the batching worker was restarted.", registry=r
        )
        self.request_duration_seconds = Histogram(
            f"{p}_request_duration_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{p}_batch_size", "Texts per encoder batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            f"{p}_batch_tokens",
            "Padded tokens per encoder batch (rows x trimmed length).",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            f"{p}_queue_wait_seconds",
            "Time a text waits in the queue before its batch starts.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            f"{p}_encode_seconds",
            "Encoder forward time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_seconds = Histogram(
            f"{p}_cache_seconds",
            "Cache lookup time per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{p}_queue_depth", "Texts waiting in the batching queue.", registry=r
        )
        self.redis_up = Gauge(
            f"{p}_redis_up", "1 when the Redis cache answers, else 0.", registry=r
        )
        self.ready = Gauge(f"{p}_ready", "1 when the service is ready to serve.", registry=r)
        self.model_info = Info(f"{p}_model", "The loaded encoder.", registry=r)
