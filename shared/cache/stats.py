"""Statistics: global counters in one Redis hash, plus this process's pending deltas.

Reads that Redis answered are counted inside the same Lua script that served them,
so hits and misses are exact and shared by every process. What happens while Redis
is away (misses served from the DB, errors) is kept here and flushed with the next
Redis call, so the totals still add up once Redis is back.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

FIELDS = ("hits", "misses", "errors", "invalidations")


class PendingCounts:
    """Thread-safe deltas not yet written to Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FIELDS, 0)

    def add(self, field: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[field] += amount

    def take(self) -> dict[str, int]:
        """Remove and return the non-zero deltas."""
        with self._lock:
            taken = {k: v for k, v in self._counts.items() if v}
            if taken:
                self._counts = dict.fromkeys(FIELDS, 0)
        return taken

    def restore(self, deltas: Mapping[str, int]) -> None:
        """Put back deltas whose flush failed."""
        with self._lock:
            for key, value in deltas.items():
                self._counts[key] += value

    def peek(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def statistics_object(
    counts: Mapping[str, int],
    *,
    cache_enabled: bool,
    redis_available: bool,
    ttl_seconds: int,
) -> dict[str, object]:
    """The statistics object of DESIGN.md (keys of the original module)."""
    hits, misses = int(counts.get("hits", 0)), int(counts.get("misses", 0))
    total = hits + misses
    if not cache_enabled:
        message = "Caching is disabled (no REDIS_URL): every request is served from the database"
    elif not redis_available:
        message = "Redis is unavailable: serving from the database; caching resumes by itself"
    else:
        message = "Cache is working normally"
    return {
        "cache_enabled": cache_enabled,
        "statistics": {
            "hits": hits,
            "misses": misses,
            "errors": int(counts.get("errors", 0)),
            "invalidations": int(counts.get("invalidations", 0)),
            "hit_rate": round(100.0 * hits / total, 2) if total else 0.0,
            "total_requests": total,
            "redis_enabled": cache_enabled,
            "redis_available": cache_enabled and redis_available,
            "ttl_seconds": ttl_seconds,
        },
        "message": message,
    }
