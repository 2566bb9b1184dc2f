"""`JobCache`: the job cache in front of the database.

Reads: cache first; on a miss one reader per key takes a short fill lease, loads the
row and fills with a versioned compare-and-set; the others wait briefly and are
served from cache (no stampede, no stale fill). A hit is checked for its seal (a keyed
MAC proving this cache wrote it at this key, `shared.cache.seal`), schema, job id and
owner before it is served; a bad entry is deleted, counted as an error and the read
goes to the database.

Writes: the database first (one transaction, version + 1), then one Redis round trip
pre-warms the entry with the new version, drops the owner's cached lists and
publishes the update.

Degrading: `_call` is the one place that decides. Any `CacheError` opens the breaker;
while it is open nobody waits on Redis. The probe that closes it first repairs the
entries of jobs written during the last TTL (their pre-warm may have been lost), so
no stale entry survives an outage that this process saw.

The cache never imports SQLAlchemy: loaders are callables handed in.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import ValidationError

from shared.cache.breaker import CircuitBreaker, Permit
from shared.cache.errors import CacheError, CorruptEntry
from shared.cache.keys import KeySpace
from shared.cache.seal import Sealer
from shared.cache.stats import PendingCounts, statistics_object
from shared.schemas import JobView, ProgressUpdate, UpdateOutcome

logger = logging.getLogger("shared.cache.redis_cache")

T = TypeVar("T")

JobLoader = Callable[[int], JobView | None]
ProgressWriter = Callable[[int, ProgressUpdate], UpdateOutcome | None]
RecentLoader = Callable[[datetime], list[tuple[int, str]]]


class Backend(Protocol):
    """What `JobCache` needs from a backend (`backend.RedisBackend`)."""

    sealer: Sealer

    def read_job(
        self, job_id: int, token: str, lease_ms: int, deltas: dict[str, int]
    ) -> tuple[int, bytes | None]: ...
    def fill_job(
        self, job_id: int, token: str, version: int, value: bytes, ttl: int, deltas: dict[str, int]
    ) -> bool: ...
    def read_job_culprit(self, job_id: int) -> str: ...
    def release_lease(self, job_id: int, token: str, deltas: dict[str, int]) -> None: ...
    def publish_job(
        self,
        job_id: int,
        client_id: str,
        version: int,
        value: bytes,
        ttl: int,
        deltas: dict[str, int],
    ) -> bool: ...
    def delete(self, keys: list[str], deltas: dict[str, int]) -> int: ...
    def read_list(
        self, client_id: str, page: str, epoch: str, ttl: int, deltas: dict[str, int]
    ) -> tuple[str, bytes | None]: ...
    def fill_list(
        self, client_id: str, epoch: str, page: str, value: bytes, deltas: dict[str, int]
    ) -> bool: ...
    def counters(self, deltas: dict[str, int]) -> dict[str, int]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class _Unavailable:
    """Sentinel: Redis was not used (off, breaker open, or the call failed)."""


UNAVAILABLE = _Unavailable()


@dataclass(frozen=True, slots=True)
class CachedJob:
    """A job as served: the validated view and the exact JSON bytes to send."""

    view: JobView
    body: bytes

    @classmethod
    def of(cls, view: JobView) -> CachedJob:
        return cls(view=view, body=view.to_json())


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl_seconds: int = 30
    finished_ttl_seconds: int = 3_600
    lease_ms: int = 500
    repair_margin_seconds: float = 5.0
    # Waiters give up on a fill this long after the lease would lapse. The grace must let
    # one waiter take the lapsed lease and fill (a poll gap, one DB read, a poll gap):
    # with 50 ms, a filler that died sent every waiter to the database at once.
    fill_grace_seconds: float = 0.25

    @property
    def wait_seconds(self) -> float:
        """How long a reader waits for another reader's fill before reading the database."""
        return self.lease_ms / 1000 + self.fill_grace_seconds

    def ttl_for(self, view: JobView) -> int:
        """Smart TTL: finished jobs never change, so they stay much longer."""
        return self.finished_ttl_seconds if view.finished else self.ttl_seconds


class JobCache:
    """The cache. `backend=None` means caching is off: every read goes to the database."""

    def __init__(
        self,
        *,
        backend: Backend | None,
        keys: KeySpace,
        load_job: JobLoader,
        write_progress: ProgressWriter | None = None,
        recent_jobs: RecentLoader | None = None,
        policy: CachePolicy | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.policy = policy or CachePolicy()
        self.breaker = breaker or CircuitBreaker()
        self._load_job = load_job
        self._write_progress = write_progress
        self._recent_jobs = recent_jobs
        self._sleep = sleep
        self._pending = PendingCounts()
        self._last_counters: dict[str, int] = {}
        self._repair_lock = threading.Lock()

    # -- the degrade decision -----------------------------------------------------------

    def _call(self, op: Callable[[Backend, dict[str, int]], T]) -> T | _Unavailable:
        """Run `op` on Redis unless it is off or the breaker is open; the only fail-open path."""
        backend = self.backend
        if backend is None:
            return UNAVAILABLE
        permit = self.breaker.acquire()
        if permit is None:
            return UNAVAILABLE
        deltas = self._pending.take()
        try:
            if permit is Permit.PROBE:
                backend.ping()
                self._repair(backend)
            result = op(backend, deltas)
        except CorruptEntry:
            # No restore: the deltas ran ahead of the failing command in the same pipeline,
            # so they have landed; putting them back would count them twice.
            # Redis answered: a foreign value at one key is no outage. Without this, a
            # probe that met one would leave the breaker half-open, skipping Redis forever.
            self.breaker.success()
            raise
        except CacheError as exc:
            # Deltas of a timed-out call may or may not have landed; we keep them (a
            # possible double count on an ambiguous timeout beats losing them).
            self._pending.restore(deltas)
            self._pending.add("errors")
            self.breaker.failure(exc)
            return UNAVAILABLE
        except Exception as exc:  # noqa: BLE001 -- the repair's DB query failed: stay open, retry later
            self._pending.restore(deltas)
            self.breaker.failure(exc)
            return UNAVAILABLE
        self.breaker.success()
        return result

    def _call_or_drop(self, op: Callable[[Backend, dict[str, int]], T]) -> T | _Unavailable:
        """`_call` for the paths with no retry loop (fills, writes, statistics): a foreign
        value at the key is dropped and counted, never raised to the caller."""
        try:
            return self._call(op)
        except CorruptEntry as exc:
            self._drop_corrupt(exc.key, counted_hit=False)
            return UNAVAILABLE

    def recover(self) -> bool:
        """Run the half-open probe for a caller that already holds the PROBE permit."""
        backend = self.backend
        if backend is None:
            return False
        try:
            backend.ping()
            self._repair(backend)
        except Exception as exc:  # noqa: BLE001 -- a failed probe of any kind keeps the breaker open
            self.breaker.failure(exc)
            return False
        self.breaker.success()
        return True

    def _repair(self, backend: Backend) -> None:
        """Drop entries of jobs written in the last TTL: their pre-warm may have been lost."""
        if self._recent_jobs is None:
            return
        since = datetime.now(UTC) - timedelta(
            seconds=self.policy.ttl_seconds + self.policy.repair_margin_seconds
        )
        with self._repair_lock:
            recent = self._recent_jobs(since)
            keys: list[str] = []
            for job_id, client_id in recent:
                keys += [self.keys.job(job_id), self.keys.lease(job_id), self.keys.jobs(client_id)]
            for start in range(0, len(keys), 3_000):
                backend.delete(keys[start : start + 3_000], {})
        logger.info(
            "repaired the cache after an outage: %d recently written jobs dropped", len(recent)
        )

    # -- reads ----------------------------------------------------------------------------

    def get(self, job_id: int, *, client_id: str | None = None) -> CachedJob | None:
        """The job (None if missing, or owned by another client when `client_id` is given)."""
        job = self._get(job_id)
        if job is None or (client_id is not None and job.view.client_id != client_id):
            return None
        return job

    def _get(self, job_id: int) -> CachedJob | None:
        token = secrets.token_hex(8)
        deadline = time.monotonic() + self.policy.wait_seconds
        delay = 0.002
        while True:
            try:
                reply = self._call(lambda b, d: b.read_job(job_id, token, self.policy.lease_ms, d))
            except CorruptEntry as exc:
                self._drop_corrupt(exc.key, counted_hit=exc.counted_hit)
                continue
            if isinstance(reply, _Unavailable):
                self._pending.add("misses")
                return self._from_db(job_id)
            code, raw = reply
            if code == 0:
                assert raw is not None
                cached = self._decode(job_id, raw)
                if cached is not None:
                    logger.debug("hit job %s v%s", job_id, cached.view.version)
                    return cached
                self._drop_corrupt(self.keys.job(job_id), counted_hit=True)
                continue
            if code == 1:
                logger.debug("miss job %s: filling under lease", job_id)
                return self._fill(job_id, token)
            if time.monotonic() >= deadline:
                # The filler is slow or dead; its lease is about to lapse. Serve the DB.
                self._pending.add("misses")
                return self._from_db(job_id)
            self._sleep(delay)
            delay = min(delay * 2, 0.05)

    def _from_db(self, job_id: int) -> CachedJob | None:
        view = self._load_job(job_id)
        return CachedJob.of(view) if view is not None else None

    def _fill(self, job_id: int, token: str) -> CachedJob | None:
        view = self._load_job(job_id)
        if view is None:
            self._call_or_drop(lambda b, d: b.release_lease(job_id, token, d))
            return None
        job = CachedJob.of(view)
        ttl = self.policy.ttl_for(view)
        stored = self._call_or_drop(
            lambda b, d: b.fill_job(job_id, token, view.version, job.body, ttl, d)
        )
        if stored is False:
            logger.debug(
                "fill of job %s v%s refused: newer entry or lease lost", job_id, view.version
            )
        return job

    def _decode(self, job_id: int, raw: bytes) -> CachedJob | None:
        try:
            view = JobView.model_validate_json(raw)
        except ValidationError:
            return None
        if view.job_id != job_id:
            return None
        return CachedJob(view=view, body=raw)

    def _drop_corrupt(self, key: str, *, counted_hit: bool) -> None:
        """A bad entry is a miss: delete it, count an error, and read again."""
        logger.warning("dropped a corrupted cache entry (%s)", key)
        if counted_hit:
            self._pending.add("hits", -1)
        self._pending.add("errors")
        self._call(lambda b, d: b.delete([key], d))

    # -- lists --------------------------------------------------------------------------------

    def get_list(self, client_id: str, page: str, load: Callable[[], bytes]) -> bytes:
        """A cached page of the client's job list (JSON bytes), `load` on a miss."""
        epoch = secrets.token_hex(8)
        try:
            reply = self._call(
                lambda b, d: b.read_list(client_id, page, epoch, self.policy.ttl_seconds, d)
            )
        except CorruptEntry as exc:
            self._drop_corrupt(exc.key, counted_hit=exc.counted_hit)
            self._pending.add("misses")
            return load()
        if isinstance(reply, _Unavailable):
            self._pending.add("misses")
            return load()
        current, raw = reply
        if raw is not None:
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                self._drop_corrupt(self.keys.jobs(client_id), counted_hit=True)
                self._pending.add("misses")
                return load()
            return raw
        body = load()
        self._call_or_drop(lambda b, d: b.fill_list(client_id, current, page, body, d))
        return body

    # -- writes -------------------------------------------------------------------------------

    def update_progress(self, job_id: int, progress: object) -> bool:
        """Validate, write the DB (one transaction, version + 1), then pre-warm and publish.

        False when there is no such job; `InvalidProgress` (a ValueError) when the update
        is malformed or would move the job backwards, and then nothing is written.
        """
        update = ProgressUpdate.parse(progress)
        if self._write_progress is None:
            raise RuntimeError("this JobCache was built without a progress writer")
        outcome = self._write_progress(job_id, update)
        if outcome is None:
            return False
        if outcome.changed:
            self.publish(outcome.view)
        return True

    def publish(self, view: JobView) -> bool:
        """After a committed write: pre-warm the new version, drop lists, publish."""
        body = view.to_json()
        ttl = self.policy.ttl_for(view)
        self._pending.add("invalidations")
        stored = self._call_or_drop(
            lambda b, d: b.publish_job(view.job_id, view.client_id, view.version, body, ttl, d)
        )
        if isinstance(stored, _Unavailable):
            logger.debug(
                "pre-warm of job %s v%s skipped: Redis unavailable", view.job_id, view.version
            )
            return False
        logger.debug("pre-warmed job %s v%s (stored=%s)", view.job_id, view.version, stored)
        return True

    def invalidate_job(self, job_id: int) -> bool:
        """Drop the job's entry and any outstanding fill lease."""
        self._pending.add("invalidations")
        done = self._call(
            lambda b, d: b.delete([self.keys.job(job_id), self.keys.lease(job_id)], d)
        )
        logger.debug("invalidated job %s", job_id)
        return not isinstance(done, _Unavailable)

    def invalidate_lists(self, client_id: str) -> bool:
        """Drop every cached page of the client's job list: one DEL."""
        self._pending.add("invalidations")
        done = self._call(lambda b, d: b.delete([self.keys.jobs(client_id)], d))
        logger.debug("invalidated the job lists of a client")
        return not isinstance(done, _Unavailable)

    # -- statistics and health ---------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def available(self) -> bool:
        """Health as the cache sees it (breaker state): no network round trip."""
        return self.backend is not None and self.breaker.available

    def stats(self) -> dict[str, object]:
        """The statistics object; global counters from Redis plus this process's pending ones."""
        counters = self._call_or_drop(lambda b, d: b.counters(d))
        if isinstance(counters, _Unavailable):
            merged = dict(self._last_counters)
            for key, value in self._pending.peek().items():
                merged[key] = merged.get(key, 0) + value
            counts = merged
        else:
            self._last_counters = counters
            counts = counters
        return statistics_object(
            counts,
            cache_enabled=self.enabled,
            redis_available=self.available(),
            ttl_seconds=self.policy.ttl_seconds,
        )

    def flush(self) -> None:
        """Write pending statistics now (at shutdown)."""
        if self._pending.peek() and self.backend is not None:
            self._call(lambda b, d: b.delete([], d))

    def close(self) -> None:
        self.flush()
        if self.backend is not None:
            self.backend.close()


def as_dict(job: CachedJob | None) -> dict[str, Any] | None:
    return job.view.model_dump(mode="json") if job is not None else None
