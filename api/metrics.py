"""Prometheus metrics of one app: HTTP requests and their latency, DB queries, the cache.

prometheus_client directly, not prometheus-fastapi-instrumentator: the route template
is already in the ASGI scope (set by the router, or by the fast poll path, which never
reaches the router), so one small middleware labels by template without matching the
path again; each app keeps its own registry (tests build many apps in one process);
and the cache figures come from a custom collector, which the instrumentator would
not give us anyway.

- `renderwatch_http_requests_total{method,route,status}` and
  `renderwatch_http_request_duration_seconds{method,route}` (histogram), and
  `renderwatch_http_requests_in_progress`, from the outermost middleware, so 413s of
  the body limit and the fast poll are counted too. A streamed response (SSE) is
  timed until its stream ends.
- `renderwatch_db_queries_total`: statements sent by this app's engine.
- `renderwatch_cache_{hits,misses,errors,invalidations,...}_total`: read from
  `JobCache.stats()` at scrape time, so they mean exactly what `GET
  /api/v2/cache/stats` says (global across every API and worker process, kept in
  Redis): never summed across processes. `renderwatch_cache_redis_available` is the
  breaker's state in the process that answers the scrape.

Several processes (`API_WORKERS` > 1): set `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's
convention, read at import) to an empty directory; `python -m api` empties it at start,
and each scrape sums the per-process files (counters and histograms of exited workers
stay counted, as Prometheus expects of counters). See the README's "Metrics" section.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter as Counter_
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.cache import JobCache

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# From a warm cached poll (~1 ms) to a slow database answer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The statistics object's counters; a key the cache does not report is not exposed.
CACHE_COUNTERS = ("hits", "misses", "errors", "invalidations", "fallbacks")
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


class CacheCollector(Collector):
    """The global cache statistics, read from the cache at scrape time."""

    def __init__(self, cache: JobCache) -> None:
        self._cache = cache

    def collect(self) -> Iterable[Metric]:
        stats = self._cache.stats()
        counts = stats["statistics"]
        assert isinstance(counts, dict)
        for name in CACHE_COUNTERS:
            if name not in counts:
                continue
            yield CounterMetricFamily(
                f"renderwatch_cache_{name}",
                f"Cache {name} as in GET /api/v2/cache/stats: global across every API and "
                "worker process.",
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
        self.http_latency = Histogram(
            "renderwatch_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self._own,
        )
        # "livesum": in multiprocess mode only live processes count (forget_dead_processes).
        self.in_progress = Gauge(
            "renderwatch_http_requests_in_progress",
            "HTTP requests being answered right now.",
            registry=self._own,
            multiprocess_mode="livesum",
        )
        self.db_queries = Counter(
            "renderwatch_db_queries",
            "SQL statements sent to the database by this app's engine.",
            registry=self._own,
        )
        self._multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        if self._multiproc_dir:
            # The counters live in per-process files; expose their sum, not our copy.
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry = self._own
        self.registry.register(CacheCollector(cache))
        self._engines: list[Engine] = []
        # Labelled children by (method, route, status): `labels()` costs more than the
        # update itself, on every request. Bounded: methods, route templates and status
        # codes are few.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe_request(self, method: str, route: str, status: str, seconds: float) -> None:
        """Count one answered request and its duration."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method, route, status),
                self.http_latency.labels(method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

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
        if self._multiproc_dir:
            forget_dead_processes(self._multiproc_dir)
        return generate_latest(self.registry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(directory: str) -> list[int]:
    """`mark_process_dead` for every process whose live gauges are still on disk.

    prometheus_client's multiprocess mode keeps "live" gauges per process; a worker
    that exits (a uvicorn worker restarted, a crash) must be marked dead or its last
    values are summed forever. Checked at each scrape, so a crash is covered too, not
    only a clean exit. Counters and histograms are kept: a counter never goes down.
    """
    dead: set[int] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = _LIVE_GAUGE_FILE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in sorted(dead):
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


def reset_multiprocess_dir(directory: str) -> None:
    """Empty the directory before the first worker starts (files of a previous run)."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


class RequestMetricsMiddleware:
    """Counts each answered request by method, route template (never the raw path) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        services = getattr(scope["app"].state, "services", None)
        if services is not None:
            services.metrics.in_progress.inc()
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if services is not None:
                services.metrics.in_progress.dec()
            self._record(scope, status, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        app: FastAPI = scope["app"]
        services = getattr(app.state, "services", None)
        if services is None:
            return
        route = scope.get("route")
        # The template keeps the label set bounded: /api/v2/jobs/{job_id}, not /api/v2/jobs/17.
        template = getattr(route, "path", None) or UNMATCHED_ROUTE
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
        services.metrics.observe_request(method, template, str(status), seconds)
