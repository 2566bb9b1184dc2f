"""Start-up wiring shared by the API and the worker: settings → engine, sessions, cache.

Call `Runtime.start(settings)` in the process that will use it (after any fork). With
caching on, it reads the database's incarnation once (`shared.meta`): the cache's key
namespace is derived from it unless CACHE_NAMESPACE is set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from shared import jobs
from shared.cache import CachePolicy, CircuitBreaker, JobCache, KeySpace, configure
from shared.cache.redis_url import parse_redis_url
from shared.cache.seal import Sealer
from shared.db import SessionFactory, build_engine, build_session_factory, run_read
from shared.meta import database_incarnation, default_namespace
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
    # The database's incarnation, read once at start; empty when caching is off (or it could
    # not be read, which also leaves caching off in this process).
    incarnation: str = ""

    @classmethod
    def start(cls, settings: Settings, *, redis_client: Any = None) -> Runtime:
        engine = build_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            statement_timeout_ms=settings.db_statement_timeout_ms,
        )
        try:
            sessions = build_session_factory(engine)
            incarnation = (
                read_incarnation(engine) if caching_configured(settings, redis_client) else ""
            )
            cache = build_cache(
                settings, sessions, redis_client=redis_client, incarnation=incarnation
            )
        except BaseException:
            engine.dispose()
            raise
        cache.start_flusher()
        configure(cache)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            cache=cache,
            incarnation=incarnation,
        )

    def close(self) -> None:
        configure(None)
        self.cache.close()
        self.engine.dispose()


def caching_configured(settings: Settings, redis_client: Any = None) -> bool:
    """Whether the settings (or an injected client) ask for a cache at all."""
    return redis_client is not None or bool(settings.redis_url)


def build_cache(
    settings: Settings,
    sessions: SessionFactory,
    *,
    redis_client: Any = None,
    incarnation: str | None = None,
) -> JobCache:
    """The cache with DB loaders; caching off when REDIS_URL is empty or redis is missing.

    `incarnation`: the database's, as `Runtime.start` read it (`read_incarnation`); None
    reads it here when caching is configured. Empty: unknown, so caching stays off.
    """
    if settings.redis_url:
        # A wrong REDIS_URL stops the process here, naming the wrong part (never the
        # password), even when the database is not up yet.
        parse_redis_url(settings.redis_url, settings.redis_mode)

    def load_job(job_id: int) -> JobView | None:
        return run_read(sessions, lambda session: jobs.get_job(job_id, session=session))

    def write_progress(job_id: int, update: ProgressUpdate) -> UpdateOutcome | None:
        with sessions() as session:
            return jobs.update_job_progress(job_id, update, session=session)

    def recent_jobs(since: datetime) -> list[tuple[int, str]]:
        return run_read(sessions, lambda session: jobs.jobs_updated_since(since, session=session))

    caching = caching_configured(settings, redis_client)
    if incarnation is None:
        incarnation = read_incarnation(sessions) if caching else ""
    keys = KeySpace(
        namespace=cache_namespace(settings, incarnation),
        job_prefix=settings.job_cache_key_prefix,
    )
    # Without the incarnation this process cannot know which database's keys are its own:
    # it serves from the database alone (`read_incarnation` said so in the log).
    backend = _build_backend(settings, keys, redis_client) if incarnation or not caching else None
    if backend is not None:
        logger.info(
            "cache keys under namespace %r (%s)",
            keys.namespace,
            "CACHE_NAMESPACE" if settings.cache_namespace else "derived from the database",
        )
    return JobCache(
        backend=backend,
        keys=keys,
        load_job=load_job,
        write_progress=write_progress,
        recent_jobs=recent_jobs,
        policy=CachePolicy(
            ttl_seconds=settings.cache_ttl_seconds,
            finished_ttl_seconds=settings.cache_finished_ttl_seconds,
            lease_ms=lease_ms(settings),
            hedge_ms=settings.cache_hedge_ms,
            stats_flush_seconds=settings.cache_stats_flush_seconds,
            missing_ttl_seconds=settings.cache_missing_ttl_seconds,
            incarnation=incarnation,
        ),
        breaker=CircuitBreaker(
            threshold=settings.breaker_failure_threshold,
            reset_seconds=settings.breaker_reset_seconds,
        ),
    )


def lease_ms(settings: Settings) -> int:
    """The fill lease: CACHE_LEASE_MS, and at least the DB statement timeout plus a margin,
    so that no DB read outlasts the lease of the reader that makes it."""
    if settings.db_statement_timeout_ms <= 0:
        return settings.cache_lease_ms
    return max(settings.cache_lease_ms, settings.db_statement_timeout_ms + 250)


def read_incarnation(source: Engine | SessionFactory) -> str:
    """The database's incarnation (one query); "" when the database does not answer.

    A database that answers without one is not migrated: `IncarnationMissing` stops the
    start with the command to run."""
    try:
        return database_incarnation(source)
    except DBAPIError as exc:
        # The type only: driver messages may carry connection details.
        logger.warning(
            "caching is off in this process: the database did not answer when its "
            "incarnation was read at start (%s); restart the process once it answers",
            type(exc.orig).__name__,
        )
        return ""


def cache_namespace(settings: Settings, incarnation: str) -> str:
    """The key prefix: CACHE_NAMESPACE when set, else one derived from the database's
    incarnation, so that two databases sharing one Redis never share an entry."""
    if settings.key_namespace or not incarnation:
        return settings.key_namespace
    return f"{default_namespace(incarnation)}:"


def _build_backend(settings: Settings, keys: KeySpace, redis_client: Any) -> Any:
    if settings.redis_url:
        logger.info(
            "cache: Redis %s", parse_redis_url(settings.redis_url, settings.redis_mode).describe()
        )
    if redis_client is None and not settings.redis_url:
        logger.info("caching is off (REDIS_URL is empty): every read goes to the database")
        return None
    try:
        from shared.cache.backend import RedisBackend, connect
    except ImportError:
        logger.warning("caching is off: the redis package is not importable")
        return None
    if redis_client is None:
        redis_client = connect(
            settings.redis_url,
            socket_timeout=settings.redis_socket_timeout,
            mode=settings.redis_mode,
        )
    return RedisBackend(redis_client, keys, build_sealer(settings))


def build_sealer(settings: Settings) -> Sealer:
    """The `Sealer` of CACHE_SEAL_KEYS (or CACHE_SEAL_KEY); logs key ids, never secrets."""
    secrets = settings.seal_secrets()
    if not secrets:
        logger.warning(
            "CACHE_SEAL_KEY is not set: cached values are sealed with the public default key"
        )
        return Sealer()
    if settings.cache_seal_keys.get_secret_value() and settings.cache_seal_key.get_secret_value():
        logger.warning("CACHE_SEAL_KEY is ignored: CACHE_SEAL_KEYS is set and replaces it")
    sealer = Sealer.from_secrets(secrets)
    sealing, *accepted = sealer.key_ids
    logger.info(
        "cache seal: new entries sealed with key id %s; also accepted: %s",
        sealing,
        ", ".join(accepted) or "none",
    )
    return sealer
