"""Prometheus metrics of one app: HTTP requests, DB queries at the engine, cache statistics.

Each app has its own registry (tests build many apps in one process). With
`PROMETHEUS_MULTIPROC_DIR` set (prometheus_client's own convention, read by the
library at import), the exposition aggregates every worker process's counters. The
cache statistics are already global (kept in Redis), so they are read once per
scrape from `JobCache.stats()` and never summed across processes.
"""

from __future__ import annotations

import os
from collections import Counter as Counter_
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.cache import JobCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class CacheCollector(Collector):
    """The global cache statistics, read from the cache at scrape time."""

    def __init__(self, cache: JobCache) -> None:
        self._cache = cache

    def collect(self) -> Iterable[Metric]:
        stats = self._cache.stats()
        counts = stats["statistics"]
        assert isinstance(counts, dict)
        for name in ("hits", "misses", "errors", "invalidations"):
            yield CounterMetricFamily(
                f"renderwatch_cache_{name}",
                f"Cache {name}, global across every API and worker process.",
                value=int(counts[name]),
            )
        yield GaugeMetricFamily(
            "renderwatch_cache_hit_rate_percent",
            "Cache hit rate in percent (hits / (hits + misses)).",
            value=float(counts["hit_rate"]),
        )
        yield GaugeMetricFamily(
            "renderwatch_cache_redis_available",
            "1 while Redis is used (breaker closed), 0 while reads go to the database.",
            value=1.0 if counts["redis_available"] else 0.0,
        )
        yield GaugeMetricFamily(
            "renderwatch_cache_enabled",
            "1 when caching is configured (REDIS_URL set).",
            value=1.0 if stats["cache_enabled"] else 0.0,
        )


class ReadBatchCollector(Collector):
    """This process's batched cache reads (README "Performance"): how many READ_JOBS
    calls of each size the async reader sent. Per process, also under multiprocess mode."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self, sizes: Counter_[int]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterable[Metric]:
        batches = CounterMetricFamily(
            "renderwatch_cache_read_batches",
            "Redis read calls of the async poll, by batch size (lower bound of a power-of-two "
            "bucket), this process only.",
            labels=["size"],
        )
        counts = dict.fromkeys(self.BUCKETS, 0)
        for size, count in list(self._sizes.items()):
            counts[max(b for b in self.BUCKETS if b <= size)] += count
        for bucket, count in counts.items():
            batches.add_metric([str(bucket)], count)
        yield batches
        yield CounterMetricFamily(
            "renderwatch_cache_batched_reads",
            "Cache reads sent in those calls, this process only.",
            value=sum(size * count for size, count in list(self._sizes.items())),
        )


class Metrics:
    """The app's counters and the registry they are exposed from."""

    def __init__(self, cache: JobCache) -> None:
        self._own = CollectorRegistry()
        self.http_requests = Counter(
            "renderwatch_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self._own,
        )
        self.db_queries = Counter(
            "renderwatch_db_queries",
            "SQL statements sent to the database by this app's engine.",
            registry=self._own,
        )
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # The counters live in per-process files; expose their sum, not our copy.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry = self._own
        self.registry.register(CacheCollector(cache))
        self._engines: list[Engine] = []
        self._children: dict[tuple[str, str, int], Any] = {}

    def request_counter(self, method: str, template: str, status: int) -> Any:
        """The labelled child of `http_requests` (looked up once per label set: the
        label sets are bounded by methods, route templates and statuses)."""
        key = (method, template, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.http_requests.labels(method, template, str(status))
        return child

    def watch_batches(self, sizes: Counter_[int]) -> None:
        """Expose the async reader's batch sizes (`AsyncJobReader.batch_sizes`)."""
        self.registry.register(ReadBatchCollector(sizes))

    def count_queries(self, engine: Engine) -> None:
        """Count every statement the engine sends (the demo and benchmarks read this)."""
        event.listen(engine, "before_cursor_execute", self._on_query)
        self._engines.append(engine)

    def _on_query(self, *_args: Any) -> None:
        self.db_queries.inc()

    def close(self) -> None:
        for engine in self._engines:
            event.remove(engine, "before_cursor_execute", self._on_query)
        self._engines.clear()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts each answered request by method, route template (never the raw path) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status)

    @staticmethod
    def _record(scope: Scope, status: int) -> None:
        app: FastAPI = scope["app"]
        services = getattr(app.state, "services", None)
        if services is None:
            return
        route = scope.get("route")
        # The template keeps the label set bounded: /api/v2/jobs/{job_id}, not /api/v2/jobs/17.
        template = getattr(route, "path", None) or UNMATCHED_ROUTE
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
        services.metrics.request_counter(method, template, status).inc()
