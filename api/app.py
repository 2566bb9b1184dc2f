"""`create_app()`: the FastAPI application. Nothing is built at import or in `create_app`.

The lifespan builds the runtime (engine, sessions, cache), the API-key resolver, the
metrics and the enqueue function, puts them on `app.state.services`, and closes them
on shutdown; so forks (uvicorn workers), tests and several configurations stay safe.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from kombu.exceptions import OperationalError as BrokerError

from api import errors, events, page, routes
from api.deps import Enqueue, Services
from api.errors import QueueUnavailable
from api.fastpoll import FastPollMiddleware
from api.hub import Hub
from api.metrics import Metrics, RequestMetricsMiddleware
from shared.apikeys import KeyResolver, lookup_client
from shared.cache.aio import AsyncJobReader
from shared.db import run_read
from shared.queue import create_celery, enqueue_render
from shared.runtime import Runtime
from shared.settings import Settings, get_settings, redact_url

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


# FastAPI's OpenTelemetry support asks on every request whether a provider is set up
# (~8 µs of a ~120 µs cached poll, bench/pollcpu.py): off unless OpenTelemetry is
# configured, which its SDK's auto-configuration does through OTEL_* variables.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def opentelemetry_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """True when an OTEL_* variable is set: FastAPI's telemetry is then left on."""
    return any(name.startswith("OTEL_") for name in environ)


# The collector's thresholds once the heap is settled (`settle_heap`): young collections
# every 20,000 allocations instead of 700, full ones at most every 100 middle ones.
SETTLED_GC_THRESHOLDS = (20_000, 20, 100)


def settle_heap() -> None:
    """Once the app has started: take everything built so far (modules, the app, its
    services: ~130,000 objects) out of the cycle collector's sight, and collect young
    objects less often.

    Each full collection walked those objects and stopped the event loop for ~45 ms,
    about once a second under load, because every young collection promotes the objects
    of the requests in flight; that was a cached poll's p99 at 64 clients (48 ms against
    a 5 ms median; README "Performance"). Frozen objects are still freed when their last
    reference goes; only a cycle among them is never collected, and they are built once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SETTLED_GC_THRESHOLDS)
    logger.info(
        "heap settled: %d objects frozen, collector thresholds %s",
        gc.get_freeze_count(),
        SETTLED_GC_THRESHOLDS,
    )


def create_served_app() -> FastAPI:
    """The app `python -m api` serves: `create_app()` that settles the heap after start-up."""
    return create_app(settle=True)


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Enqueue | None = None,
    redis_client: Any = None,
    subscriber: Callable[[], Any] | None = None,
    settle: bool = False,
) -> FastAPI:
    """The API app; `enqueue`, `redis_client` and `subscriber` (builds the asyncio client
    of the live-updates subscription) are seams for tests (default: from settings).
    `settle`: call `settle_heap` once started (for a serving process, not for tests,
    which build many apps in one process)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = start_services(
            settings or get_settings(),
            enqueue=enqueue,
            redis_client=redis_client,
            subscriber=subscriber,
        )
        app.state.services = services
        assert services.hub is not None
        services.hub.start()
        if settle:
            settle_heap()
        try:
            yield
        finally:
            del app.state.services
            await services.hub.close()
            await services.reader.close()
            stop_services(services)

    app = FastAPI(
        title="renderwatch",
        summary="Progress of video-generation jobs, served from a Redis cache in front of SQL.",
        version="2",
        lifespan=lifespan,
        telemetry=None if opentelemetry_wanted() else NO_TELEMETRY,
    )
    errors.install(app)
    app.add_middleware(errors.BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    # The warm cached poll is answered here, before routing (see api.fastpoll).
    app.add_middleware(FastPollMiddleware)
    # Added last, so outermost: it also counts the 413s of the body limit.
    app.add_middleware(RequestMetricsMiddleware)
    app.include_router(routes.router)
    app.include_router(events.router)
    app.include_router(routes.ops)
    app.include_router(page.router)
    app.mount("/static", page.static, name="static")
    return app


def start_services(
    settings: Settings,
    *,
    enqueue: Enqueue | None = None,
    redis_client: Any = None,
    subscriber: Callable[[], Any] | None = None,
) -> Services:
    """Build everything a running app needs (in the serving process, after any fork)."""
    runtime = Runtime.start(settings, redis_client=redis_client)
    try:
        metrics = Metrics(runtime.cache)
        metrics.count_queries(runtime.engine)

        def lookup(key: str) -> str | None:
            return run_read(runtime.sessions, lambda session: lookup_client(key, session=session))

        keys = KeyResolver(lookup, ttl_seconds=settings.api_key_cache_seconds)
        reader = AsyncJobReader(
            runtime.cache,
            async_redis(settings, redis_client),
            batching=settings.cache_read_batching,
            split_by_slot=redis_is_cluster(settings),
        )
        metrics.watch_batches(reader.batch_sizes)
        hub = Hub(
            subscriber or subscription_client(settings, redis_client),
            runtime.cache.keys,
            max_streams=settings.sse_max_streams,
        )
        close_enqueue: Callable[[], None] = _nothing
        if enqueue is None:
            enqueue, close_enqueue = celery_enqueue(settings)
    except BaseException:
        runtime.close()
        raise
    logger.info(
        "api started: database %s, cache %s",
        redact_url(settings.database_url),
        "on" if runtime.cache.enabled else "off",
    )
    return Services(
        runtime=runtime,
        keys=keys,
        enqueue=enqueue,
        metrics=metrics,
        reader=reader,
        close_enqueue=close_enqueue,
        hub=hub,
    )


def async_redis(settings: Settings, redis_client: Any) -> Any:
    """The asyncio client of the hot read; None (read through the sync cache) when a test
    injected its own sync client, or when caching is off or redis is not importable."""
    if redis_client is not None or not settings.redis_url:
        return None
    try:
        from shared.cache.aio import connect_async
    except ImportError:
        return None
    return connect_async(
        settings.redis_url, socket_timeout=settings.redis_socket_timeout, mode=settings.redis_mode
    )


def redis_is_cluster(settings: Settings) -> bool:
    """Whether REDIS_URL names a Redis Cluster (`redis+cluster://`, or REDIS_MODE=cluster):
    then a batch of reads is split by hash slot."""
    if not settings.redis_url:
        return False
    from shared.cache.redis_url import parse_redis_url

    return parse_redis_url(settings.redis_url, settings.redis_mode).mode == "cluster"


def subscription_client(settings: Settings, redis_client: Any) -> Callable[[], Any] | None:
    """Builds the asyncio client of the live-updates subscription (api.hub), one per
    (re)connect; None (streams poll the cache path) in the cases `async_redis` gives None.
    No read timeout: the connection idles between messages; the hub pings it instead."""
    if redis_client is not None or not settings.redis_url:
        return None
    try:
        from redis.asyncio import Redis as AsyncRedis
    except ImportError:
        return None
    url, timeout = settings.redis_url, settings.redis_socket_timeout

    def connect() -> Any:
        return AsyncRedis.from_url(url, socket_connect_timeout=timeout, health_check_interval=0)

    return connect


def stop_services(services: Services) -> None:
    """Release what `start_services` built (flushes pending cache statistics)."""
    services.metrics.close()
    services.close_enqueue()
    services.runtime.close()


def celery_enqueue(settings: Settings) -> tuple[Enqueue, Callable[[], None]]:
    """Send render tasks through the Celery broker; broker failures become `QueueUnavailable`."""
    celery = create_celery(settings)

    def enqueue(job_id: int) -> str:
        try:
            return enqueue_render(celery, job_id)
        except (BrokerError, OSError) as exc:
            # The type only: broker messages may name hosts or credentials.
            raise QueueUnavailable(
                f"the job queue refused the task ({type(exc).__name__})"
            ) from exc

    return enqueue, celery.close


def _nothing() -> None:
    return None
