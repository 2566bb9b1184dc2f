"""Start-up wiring shared by the API and the worker: settings → engine, sessions, cache.

Call `Runtime.start(settings)` in the process that will use it (after any fork).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from shared import jobs
from shared.cache import CachePolicy, CircuitBreaker, JobCache, KeySpace, configure
from shared.cache.redis_url import parse_redis_url
from shared.db import SessionFactory, build_engine, build_session_factory, run_read
from shared.schemas import JobView, ProgressUpdate, UpdateOutcome
from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a process needs at run time; `close()` releases it."""

    settings: Settings
    engine: Engine
    sessions: SessionFactory
    cache: JobCache

    @classmethod
    def start(cls, settings: Settings, *, redis_client: Any = None) -> Runtime:
        engine = build_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        sessions = build_session_factory(engine)
        cache = build_cache(settings, sessions, redis_client=redis_client)
        configure(cache)
        return cls(settings=settings, engine=engine, sessions=sessions, cache=cache)

    def close(self) -> None:
        configure(None)
        self.cache.close()
        self.engine.dispose()


def build_cache(
    settings: Settings, sessions: SessionFactory, *, redis_client: Any = None
) -> JobCache:
    """The cache with DB loaders; caching off when REDIS_URL is empty or redis is missing."""

    def load_job(job_id: int) -> JobView | None:
        return run_read(sessions, lambda session: jobs.get_job(job_id, session=session))

    def write_progress(job_id: int, update: ProgressUpdate) -> UpdateOutcome | None:
        with sessions() as session:
            return jobs.update_job_progress(job_id, update, session=session)

    def recent_jobs(since: datetime) -> list[tuple[int, str]]:
        return run_read(sessions, lambda session: jobs.jobs_updated_since(since, session=session))

    keys = KeySpace(namespace=settings.key_namespace, job_prefix=settings.job_cache_key_prefix)
    return JobCache(
        backend=_build_backend(settings, keys, redis_client),
        keys=keys,
        load_job=load_job,
        write_progress=write_progress,
        recent_jobs=recent_jobs,
        policy=CachePolicy(
            ttl_seconds=settings.cache_ttl_seconds,
            finished_ttl_seconds=settings.cache_finished_ttl_seconds,
            lease_ms=settings.cache_lease_ms,
        ),
        breaker=CircuitBreaker(
            threshold=settings.breaker_failure_threshold,
            reset_seconds=settings.breaker_reset_seconds,
        ),
    )


def _build_backend(settings: Settings, keys: KeySpace, redis_client: Any) -> Any:
    if settings.redis_url:
        # A wrong REDIS_URL stops the process here, naming the wrong part (never the
        # password), instead of failing on the first request.
        spec = parse_redis_url(settings.redis_url, settings.redis_mode)
        logger.info("cache: Redis %s", spec.describe())
    if redis_client is None and not settings.redis_url:
        logger.info("caching is off (REDIS_URL is empty): every read goes to the database")
        return None
    try:
        from shared.cache.backend import RedisBackend, connect
        from shared.cache.seal import Sealer
    except ImportError:
        logger.warning("caching is off: the redis package is not importable")
        return None
    if redis_client is None:
        redis_client = connect(
            settings.redis_url,
            socket_timeout=settings.redis_socket_timeout,
            mode=settings.redis_mode,
        )
    secret = settings.cache_seal_key.get_secret_value()
    if not secret:
        logger.warning(
            "CACHE_SEAL_KEY is not set: cached values are sealed with the public default key"
        )
    return RedisBackend(redis_client, keys, Sealer(secret.encode()) if secret else Sealer())
