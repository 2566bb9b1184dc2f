"""`JobCache`: the job cache in front of the database, and the synchronous driver.

Reads: the sans-IO state machine `machine.read_job` decides; `_drive` performs its effects
with the blocking backend. On a miss one reader per key takes a fill lease, loads the row
and fills; the others wait for that fill (as long as the holder's lease runs) and are
served from cache. Redis decides whether a fill is stored: never older than the job's
version floor, never after a write or invalidation revoked the lease (`scripts`).
Unknown ids are cached briefly as tombstones.

Writes: the database first (one transaction, version + 1), then one Redis round trip
pre-warms the entry with the new version (revoking fill leases), publishes it if it was
stored, and drops the owner's cached lists.

Degrading: `machine.Gate` is the one place that decides. UNAVAILABLE failures open the
breaker; while it is open nobody waits on Redis. The probe that closes it first repairs
the entries of jobs written during the last TTL (their pre-warm may have been lost), so
no stale entry survives an outage that this process saw.

The cache never imports SQLAlchemy: loaders are callables handed in.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import orjson

from shared.cache.breaker import CircuitBreaker, Ticket
from shared.cache.errors import ErrorClass
from shared.cache.keys import KeySpace
from shared.cache.machine import (
    CachedJob,
    DropEntry,
    DropKey,
    Effect,
    Failed,
    FillEntry,
    Foreign,
    Gate,
    Hit,
    LoadJob,
    Probe,
    ReadEntry,
    ReadPolicy,
    ReadReply,
    ReadResult,
    Sleep,
    Source,
    Stored,
    Why,
    WriteReply,
    decode,
    read_job,
)
from shared.cache.seal import Sealer
from shared.cache.stats import Batch, PendingCounts, statistics_object
from shared.schemas import JobView, ProgressUpdate, UpdateOutcome

logger = logging.getLogger("shared.cache.redis_cache")

JobLoader = Callable[[int], JobView | None]
ProgressWriter = Callable[[int, ProgressUpdate], UpdateOutcome | None]
RecentLoader = Callable[[datetime], list[tuple[int, str]]]
T = TypeVar("T")

__all__ = ["Backend", "CachePolicy", "CachedJob", "JobCache", "ReadResult", "as_dict"]


class _LeaseTokens:
    """Unique lease tokens without a `secrets` call per read.

    A token only has to differ from every other reader's (the lease script compares
    it with the holder's): a random per-process prefix and a counter do that. A forked
    child draws a fresh prefix, so a worker never reuses its parent's tokens.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._next = itertools.count().__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():x}"


lease_token = _LeaseTokens()
os.register_at_fork(after_in_child=lease_token.reset)


class Backend(Protocol):
    """What `JobCache` needs from a backend (`backend.RedisBackend`)."""

    sealer: Sealer

    def read_job(self, job_id: int, token: str, lease_ms: int, incarnation: str) -> ReadReply: ...
    def read_reply(self, job_id: int, reply: Any) -> ReadReply: ...
    def read_job_culprit(self, job_id: int) -> str: ...
    def fill_job(
        self,
        job_id: int,
        token: str,
        rev: str,
        version: int,
        value: bytes,
        ttl: int,
        incarnation: str,
        floor_ttl: int,
    ) -> WriteReply: ...
    def fill_missing(
        self, job_id: int, token: str, rev: str, ttl: int, incarnation: str
    ) -> WriteReply: ...
    def write_job(
        self,
        job_id: int,
        client_id: str,
        version: int,
        value: bytes,
        ttl: int,
        incarnation: str,
        floor_ttl: int,
    ) -> WriteReply: ...
    def drop_job(self, job_id: int, *, revoke: bool, floor_ttl: int) -> WriteReply: ...
    def drop_keys(self, keys: Sequence[str]) -> WriteReply: ...
    def delete(self, keys: Sequence[str]) -> int: ...
    def read_list(
        self, client_id: str, page: str, epoch: str, ttl: int
    ) -> tuple[str, Hit | None] | Failed | Foreign: ...
    def fill_list(self, client_id: str, epoch: str, page: str, value: bytes) -> WriteReply: ...
    def flush_stats(self, batches: Sequence[Batch]) -> list[WriteReply]: ...
    def counters(self) -> tuple[dict[str, int], str | None] | Failed | Foreign: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl_seconds: int = 30
    finished_ttl_seconds: int = 3_600
    lease_ms: int = 500
    repair_margin_seconds: float = 5.0
    # A waiter keeps waiting this long past the end of the holder's lease: the time for one
    # waiter to take the lapsed lease, read the DB and fill.
    fill_grace_seconds: float = 0.25
    # The database incarnation (restored or recreated DBs differ): part of every entry's
    # compare-and-set, so entries of another incarnation never block this one.
    incarnation: str = ""
    # "No such job" is cached this long (a tombstone; a create or write overrides it).
    missing_ttl_seconds: int = 5
    # The version floor outlives the entry by this long (at least the finished TTL).
    floor_ttl_seconds: int = 86_400
    # A reader that keeps meeting bad entries reads the DB after this many tries.
    max_read_attempts: int = 3
    # The asyncio reader reads the DB when Redis has not answered within this delay
    # (0: never hedge); the breaker still waits for the full socket timeout.
    hedge_ms: int = 0
    # Statistics are flushed at most this often after a Redis call, and by the flusher.
    stats_flush_seconds: float = 1.0

    @property
    def wait_seconds(self) -> float:
        """At most this long does a reader wait for another reader's fill."""
        return self.lease_ms / 1000 + self.fill_grace_seconds

    @property
    def read_policy(self) -> ReadPolicy:
        return ReadPolicy(
            lease_seconds=self.lease_ms / 1000,
            fill_grace_seconds=self.fill_grace_seconds,
            max_wait_seconds=self.wait_seconds,
            max_attempts=self.max_read_attempts,
        )

    def ttl_for(self, view: JobView) -> int:
        """Smart TTL: finished jobs never change, so they stay much longer."""
        return self.finished_ttl_seconds if view.finished else self.ttl_seconds

    @property
    def floor_ttl(self) -> int:
        return max(self.floor_ttl_seconds, self.finished_ttl_seconds, self.ttl_seconds)


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.policy = policy or CachePolicy()
        self.breaker = breaker or CircuitBreaker()
        self._load_job = load_job
        self._write_progress = write_progress
        self._recent_jobs = recent_jobs
        self._sleep = sleep
        self._clock = clock
        self._pending = PendingCounts()
        self.gate = Gate(self.breaker, self._pending)
        self._last_counters: dict[str, int] = {}
        self._since: str | None = None
        self._repair_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last_flush = clock()
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    # -- effects, synchronously ---------------------------------------------------------------

    def _drive(self, machine: Any) -> Any:
        """Run a sans-IO machine to its result, performing each effect it yields."""
        reply: object = None
        try:
            while True:
                effect = machine.send(reply)
                reply = self._perform(effect)
        except StopIteration as stop:
            return stop.value

    def _perform(self, effect: Effect) -> object:
        backend = self.backend
        if isinstance(effect, LoadJob):
            return self._load_job(effect.job_id)
        if isinstance(effect, Sleep):
            self._sleep(effect.seconds)
            return None
        if isinstance(effect, Probe):
            return self.recover(effect.ticket)
        assert backend is not None
        try:
            if isinstance(effect, ReadEntry):
                return backend.read_job(
                    effect.job_id, effect.token, self.policy.lease_ms, self.policy.incarnation
                )
            if isinstance(effect, FillEntry):
                return self._fill(backend, effect)
            if isinstance(effect, DropEntry):
                return backend.drop_job(
                    effect.job_id, revoke=False, floor_ttl=self.policy.floor_ttl
                )
            if isinstance(effect, DropKey):
                return backend.drop_keys([effect.key])
        except Exception as exc:  # noqa: BLE001 -- any backend surprise is a failed call
            return Failed(ErrorClass.UNAVAILABLE, exc)
        raise TypeError(f"unknown effect {effect!r}")

    def _fill(self, backend: Backend, effect: FillEntry) -> WriteReply:
        view, policy = effect.view, self.policy
        if view is None:
            return backend.fill_missing(
                effect.job_id, effect.token, effect.rev, policy.missing_ttl_seconds,
                policy.incarnation,
            )  # fmt: skip
        stored = backend.fill_job(
            effect.job_id,
            effect.token,
            effect.rev,
            view.version,
            view.to_json(),
            policy.ttl_for(view),
            policy.incarnation,
            policy.floor_ttl,
        )
        if isinstance(stored, Stored) and not stored.stored:
            logger.debug("fill of job %s v%s refused: newer or revoked", view.job_id, view.version)
        return stored

    def _redis(self, op: Callable[[Backend], T]) -> T | Failed | None:
        """One Redis call outside reads (writes, lists, statistics), through the gate."""
        backend = self.backend
        if backend is None:
            return None
        ticket = self.gate.admit()
        if ticket is not None and ticket.probe and not self.recover(ticket):
            return None
        if ticket is not None and ticket.probe:
            ticket = self.gate.admit()
        if ticket is None:
            return None
        reply: T | Failed
        try:
            reply = op(backend)
        except Exception as exc:  # noqa: BLE001 -- any backend surprise is a failed call
            reply = Failed(ErrorClass.UNAVAILABLE, exc)
        self.gate.settle(ticket, reply)
        if isinstance(reply, Foreign):
            logger.warning("dropped a value of the wrong type (%s)", reply.key)
            self.gate.count("errors")
            backend.drop_keys([reply.key])
        self._maybe_flush()
        return reply

    # -- the probe ------------------------------------------------------------------------------

    def recover(self, ticket: Ticket | None = None) -> bool:
        """Run the half-open probe (ping, then repair) for the holder of the PROBE ticket."""
        backend = self.backend
        if backend is None:
            return False
        try:
            backend.ping()
            self._repair(backend)
        except Exception as exc:  # noqa: BLE001 -- a failed probe of any kind keeps the breaker open
            self.breaker.failure(exc, ticket)
            return False
        self.breaker.success(ticket)
        self.flush(wait=False)  # the counts made while Redis was away
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
                backend.delete(keys[start : start + 3_000])
        logger.info(
            "repaired the cache after an outage: %d recently written jobs dropped", len(recent)
        )

    # -- reads ----------------------------------------------------------------------------

    def get(self, job_id: int, *, client_id: str | None = None) -> CachedJob | None:
        """The job (None if missing, or owned by another client when `client_id` is given)."""
        job = self.read(job_id).job
        if job is None or (client_id is not None and job.client_id != client_id):
            return None
        return job

    def read(self, job_id: int) -> ReadResult:
        """A cached read and what happened (`machine.ReadResult`)."""
        if self.backend is None:
            self._pending.add("misses")
            view = self._load_job(job_id)
            return ReadResult(CachedJob.of(view) if view else None, Source.DATABASE, Why.OFF)
        result = self._drive(self.machine(job_id))
        self._maybe_flush()
        assert isinstance(result, ReadResult)
        return result

    def machine(self, job_id: int) -> Any:
        """The sans-IO read of `job_id` (for drivers)."""
        return read_job(
            job_id,
            token=lease_token(),
            gate=self.gate,
            policy=self._read_policy(),
            clock=self._clock,
        )

    def _read_policy(self) -> ReadPolicy:
        """`policy.read_policy`, built once per policy (not once per read)."""
        cached = self.__dict__.get("_read_policy_of")
        if cached is None or cached[0] is not self.policy:
            cached = (self.policy, self.policy.read_policy)
            self.__dict__["_read_policy_of"] = cached
        return cached[1]

    def _from_db(self, job_id: int) -> CachedJob | None:
        view = self._load_job(job_id)
        return CachedJob.of(view) if view is not None else None

    def _decode(self, job_id: int, raw: bytes) -> CachedJob | None:
        return decode(job_id, raw)

    # -- lists --------------------------------------------------------------------------------

    def get_list(self, client_id: str, page: str, load: Callable[[], bytes]) -> bytes:
        """A cached page of the client's job list (JSON bytes), `load` on a miss."""
        epoch = secrets.token_hex(8)
        ttl = self.policy.ttl_seconds
        reply = self._redis(lambda b: b.read_list(client_id, page, epoch, ttl))
        if not isinstance(reply, tuple):
            self._pending.add("misses")
            return load()
        current, hit = reply
        if hit is not None:
            good = hit.sealed
            if good:
                try:
                    orjson.loads(hit.value)
                except orjson.JSONDecodeError:
                    good = False
            if good:
                self._pending.add("hits")
                return hit.value
            logger.warning("dropped a corrupted cache entry (a job list)")
            self._pending.add("errors")
            self._pending.add("misses")
            self._redis(lambda b: b.drop_keys([self.keys.jobs(client_id)]))
            return load()
        self._pending.add("misses")
        body = load()
        self._redis(lambda b: b.fill_list(client_id, current, page, body))
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
        """After a committed write (or a create): pre-warm the new version, revoking fill
        leases, publish it if stored, drop the owner's lists."""
        body = view.to_json()
        policy = self.policy
        self._pending.add("invalidations")
        stored = self._redis(
            lambda b: b.write_job(
                view.job_id,
                view.client_id,
                view.version,
                body,
                policy.ttl_for(view),
                policy.incarnation,
                policy.floor_ttl,
            )
        )
        if not isinstance(stored, Stored):
            logger.debug(
                "pre-warm of job %s v%s skipped: Redis unavailable", view.job_id, view.version
            )
            return False
        logger.debug("pre-warmed job %s v%s (stored=%s)", view.job_id, view.version, stored.stored)
        return True

    def invalidate_job(self, job_id: int) -> bool:
        """Drop the job's entry and any outstanding fill lease (fills in flight are refused)."""
        self._pending.add("invalidations")
        done = self._redis(
            lambda b: b.drop_job(job_id, revoke=True, floor_ttl=self.policy.floor_ttl)
        )
        logger.debug("invalidated job %s", job_id)
        return done is not None and not isinstance(done, Failed)

    def invalidate_lists(self, client_id: str) -> bool:
        """Drop every cached page of the client's job list: one DEL."""
        self._pending.add("invalidations")
        done = self._redis(lambda b: b.drop_keys([self.keys.jobs(client_id)]))
        logger.debug("invalidated the job lists of a client")
        return done is not None and not isinstance(done, Failed)

    # -- statistics and health ---------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def available(self) -> bool:
        """Health as the cache sees it (breaker state): no network round trip."""
        return self.backend is not None and self.breaker.available

    def stats(self) -> dict[str, object]:
        """The statistics object: this process's counts flushed, then the global counters."""
        self.flush()
        counters = self._redis(lambda b: b.counters())
        if isinstance(counters, tuple):
            counts, self._since = counters
            self._last_counters = dict(counts)
            pending = self._pending.peek()
        else:
            counts = dict(self._last_counters)
            pending = self._pending.peek()
        merged = {k: counts.get(k, 0) + pending.get(k, 0) for k in set(counts) | set(pending)}
        return statistics_object(
            merged,
            cache_enabled=self.enabled,
            redis_available=self.available(),
            ttl_seconds=self.policy.ttl_seconds,
            since=self._since,
        )

    def flush_due(self) -> bool:
        """True (once) when counts wait and the last flush is `stats_flush_seconds` old.

        Never while the flusher thread runs (`start_flusher`, every API and worker
        process): it flushes on the same period, so a piggybacked flush would only put a
        second round trip on the path of the read or write that happened to trigger it.
        """
        if self._flusher is not None and self._flusher.is_alive():
            return False
        now = self._clock()
        if now - self._last_flush < self.policy.stats_flush_seconds or not self._pending.due():
            return False
        self._last_flush = now
        return True

    def _maybe_flush(self) -> None:
        """Piggybacked flush: at most once per `stats_flush_seconds`, after a Redis call."""
        if self.flush_due():
            self.flush(wait=False)

    def flush(self, *, wait: bool = True) -> bool:
        """Write this process's counts now, in idempotent batches. True when all landed.

        `wait=False` (periodic and piggybacked flushes) skips when another thread is
        flushing; an explicit flush waits for it, so what it reports afterwards is exact.
        """
        backend = self.backend
        if backend is None or not self._pending.due():
            return True
        acquired = (
            self._flush_lock.acquire(timeout=5.0) if wait else self._flush_lock.acquire(False)
        )
        if not acquired:
            return False  # another thread is flushing these very counts
        try:
            self._last_flush = self._clock()
            ticket = self.gate.admit()
            if ticket is None or ticket.probe:
                if ticket is not None:
                    self.recover(ticket)
                return False
            for _ in range(2):  # once more after dropping a foreign value at the stats key
                landed, foreign = self._flush_batches(backend, ticket)
                if not foreign:
                    break
            return landed
        finally:
            self._flush_lock.release()

    def _flush_batches(self, backend: Backend, ticket: Ticket) -> tuple[bool, bool]:
        """Send the unacknowledged batches: (all landed, met a foreign stats key)."""
        batches = self._pending.batches()
        try:
            replies = backend.flush_stats(batches)
        except Exception as exc:  # noqa: BLE001 -- any backend surprise is a failed call
            replies = [Failed(ErrorClass.UNAVAILABLE, exc)] * len(batches)
        landed, foreign = True, False
        for batch, reply in zip(batches, replies, strict=True):
            if isinstance(reply, Foreign):
                # Our own stats key holds a foreign type: drop it, send again.
                logger.warning("dropped a value of the wrong type (%s)", reply.key)
                self._pending.add("errors")
                backend.drop_keys([reply.key])
                landed, foreign = False, True
            elif isinstance(reply, Failed) and reply.kind is not ErrorClass.DATA:
                self.gate.settle(ticket, reply)
                landed = False
            else:
                if isinstance(reply, Failed):
                    self.gate.settle(None, reply)  # bad counters were reset, then counted
                self._pending.acknowledge(batch)
        if landed:
            self.gate.settle(ticket, None)
        return landed, foreign

    def start_flusher(self) -> None:
        """Flush statistics every `stats_flush_seconds` in a daemon thread (idempotent)."""
        if self._flusher is not None or self.backend is None:
            return
        this = weakref.ref(self)
        stop, every = self._stop, self.policy.stats_flush_seconds

        def run() -> None:
            while not stop.wait(every):
                cache = this()
                if cache is None:
                    return
                try:
                    cache.flush(wait=False)
                except Exception:  # noqa: BLE001 -- the next round retries
                    logger.debug("periodic statistics flush failed; retrying")
                del cache

        self._flusher = threading.Thread(target=run, name="cache-stats-flush", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        if self.backend is not None:
            self.backend.close()


def as_dict(job: CachedJob | None) -> dict[str, Any] | None:
    return job.view.model_dump(mode="json") if job is not None else None
