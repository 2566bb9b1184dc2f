"""Statistics: global counters in one Redis hash, counted in each process, flushed in batches.

Every read served is counted here (a hit or a miss), never inside a read script: the
scripts stay within one Redis Cluster slot, and a counting failure can never fail a read.
Counts are flushed to the stats hash in batches; a batch has an id that Redis accepts once
(`scripts.FLUSH_STATS`), so a batch re-sent after an ambiguous timeout lands once. A batch
whose flush failed is kept, with the same id and counts, and re-sent first. Flushes happen
at most every `flush_seconds` after a Redis call, from the periodic flusher thread, and
whenever someone asks for the statistics (so a single process's counts are exact at once).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

FIELDS = ("hits", "misses", "errors", "invalidations")


@dataclass(frozen=True, slots=True)
class Batch:
    """Counts to add once: `batch_id` is unique per process and sequence number."""

    batch_id: str
    counts: tuple[tuple[str, int], ...]


class PendingCounts:
    """Thread-safe counts not yet written to Redis, cut into idempotent batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FIELDS, 0)
        self._prefix = secrets.token_hex(8)
        self._seq = 0
        self._unsent: list[Batch] = []

    def add(self, field: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[field] += amount

    def batches(self) -> list[Batch]:
        """Batches to send: the ones not yet acknowledged, then one of the counts since."""
        with self._lock:
            counts = tuple((k, v) for k, v in self._counts.items() if v)
            if counts:
                self._seq += 1
                self._unsent.append(Batch(f"{self._prefix}-{self._seq}", counts))
                self._counts = dict.fromkeys(FIELDS, 0)
            return list(self._unsent)

    def acknowledge(self, batch: Batch) -> None:
        """Redis has the batch (counted now or before): never send it again."""
        with self._lock:
            if batch in self._unsent:
                self._unsent.remove(batch)

    def due(self) -> bool:
        with self._lock:
            return bool(self._unsent) or any(self._counts.values())

    def peek(self) -> dict[str, int]:
        """Everything not yet acknowledged by Redis (for the statistics while it is away)."""
        with self._lock:
            merged = dict(self._counts)
            for batch in self._unsent:
                for key, value in batch.counts:
                    merged[key] += value
            return merged


def since_text(raw: object) -> str | None:
    """The `since` field of the stats hash (Unix seconds of the Redis clock) as ISO 8601."""
    if raw is None:
        return None
    try:
        seconds = int(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def statistics_object(
    counts: Mapping[str, int],
    *,
    cache_enabled: bool,
    redis_available: bool,
    ttl_seconds: int,
    since: str | None = None,
) -> dict[str, object]:
    """The statistics object of DESIGN.md (keys of the original module), plus `since`:
    when the global counters started (a Redis restart without persistence restarts them)."""
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
            "since": since,
        },
        "message": message,
    }
