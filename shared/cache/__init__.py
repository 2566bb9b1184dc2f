"""renderwatch's job cache: Redis in front of the database, never a dependency.

Public API (stable names from the original module)::

    get_job_with_cache(job_id)                      cache first, DB on miss or Redis failure
    update_job_progress_with_cache(job_id, progress) DB write, then versioned pre-warm
    invalidate_job_cache(job_id)                    drop the entry and any fill lease
    invalidate_user_jobs_cache(client_id)           drop a client's cached lists, one DEL
    get_cache_stats()                               global statistics object
    redis_available()                               breaker state, no round trip

The functions act on the process's cache, set at start-up with `configure()` (the
API's lifespan and the worker's process init do it; see `shared.runtime`).
"""

from __future__ import annotations

from typing import Any

from shared.cache.breaker import CircuitBreaker
from shared.cache.core import CachedJob, CachePolicy, JobCache, as_dict
from shared.cache.errors import CacheError, CorruptEntry
from shared.cache.keys import KeySpace

CACHE_TTL_SECONDS = 30
JOB_CACHE_KEY_PREFIX = "job"

_current: JobCache | None = None


def configure(cache: JobCache | None) -> None:
    """Make `cache` the one the module-level functions use (None to unset)."""
    global _current
    _current = cache


def current() -> JobCache:
    if _current is None:
        raise RuntimeError(
            "shared.cache is not configured: call shared.runtime.Runtime.start() first"
        )
    return _current


def get_job_with_cache(job_id: int, *, client_id: str | None = None) -> dict[str, Any] | None:
    """The job object, or None when there is no such job (or it is another client's)."""
    return as_dict(current().get(job_id, client_id=client_id))


def update_job_progress_with_cache(job_id: int, progress: object) -> bool:
    """Write progress (validated, versioned) and pre-warm Redis; False if no such job."""
    return current().update_progress(job_id, progress)


def invalidate_job_cache(job_id: int) -> bool:
    """Drop the job's cache entry and any outstanding fill lease."""
    return current().invalidate_job(job_id)


def invalidate_user_jobs_cache(client_id: str) -> bool:
    """Drop every cached list of the client's jobs (one Redis call)."""
    return current().invalidate_lists(client_id)


def get_cache_stats() -> dict[str, object]:
    """The statistics object (global across processes)."""
    return current().stats()


def redis_available() -> bool:
    """Redis health as the cache's breaker sees it; never a network round trip."""
    return _current is not None and _current.available()


__all__ = [
    "CACHE_TTL_SECONDS",
    "JOB_CACHE_KEY_PREFIX",
    "CacheError",
    "CachePolicy",
    "CachedJob",
    "CircuitBreaker",
    "CorruptEntry",
    "JobCache",
    "KeySpace",
    "configure",
    "current",
    "get_cache_stats",
    "get_job_with_cache",
    "invalidate_job_cache",
    "invalidate_user_jobs_cache",
    "redis_available",
    "update_job_progress_with_cache",
]
