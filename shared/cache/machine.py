"""The sans-IO core of a cached job read: one state machine for the sync and async paths.

`read_job(...)` is a generator. It never touches the network, the database or the clock
itself: it yields *effects* (`ReadEntry`, `LoadJob`, `FillEntry`, `DropEntry`, `DropKey`,
`Probe`, `Sleep`) and receives their results; a driver (`core.JobCache` for threads,
`aio.AsyncJobReader` for asyncio) performs them. Redis effects come back as results, never
exceptions: `Hit`, `Lease`, `Busy`, `Foreign`, `Stored`, `Done` or `Failed` (with an
`ErrorClass`). `Gate` is the pure part that permits Redis calls (the circuit breaker's
tickets), counts statistics and decides what a failure means.

Because the core is sans-IO, every interleaving of readers, writers and faults can be
explored without timing luck (`tests/model/`).

The rules it implements (README "The cache and its guarantees"):
- a hit is served only if its seal verified, it parses as a job of the asked id, or it is
  a sealed tombstone (no such job);
- a bad entry or a foreign value is dropped and counted as an error; the read retries a
  bounded number of times, then reads the database;
- a miss with the lease reads the database and fills (the fill may be late; Redis decides
  by version floor and revocation count whether it is stored);
- a miss without the lease waits for the holder's fill while the holder's lease runs
  (plus a grace), bounded by `max_wait_seconds` in total, then reads the database;
- a failed Redis call reads the database; only UNAVAILABLE failures reach the breaker;
- statistics: every read served is exactly one hit or one miss, counted here.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import orjson

from shared.cache.breaker import CircuitBreaker, Ticket
from shared.cache.errors import ErrorClass
from shared.cache.stats import PendingCounts
from shared.schemas import FINISHED_STATUSES, JobView

logger = logging.getLogger("shared.cache.redis_cache")

TOMBSTONE = b""


class CachedJob:
    """A job as served: the exact JSON bytes to send, and the fields a poll needs.

    A hit is served from its sealed bytes without validating the whole job: the seal
    says this cache wrote exactly these bytes (from a validated `JobView`) at this key,
    so one JSON parse for `job_id`, `client_id` and `version` is enough for ownership
    and the ETag. The full `view` is validated on first use (README "The cache and its
    guarantees").
    """

    __slots__ = ("_view", "body", "client_id", "finished", "job_id", "version")

    def __init__(
        self,
        view: JobView | None = None,
        body: bytes = b"",
        *,
        job_id: int = 0,
        client_id: str = "",
        version: int = 0,
        finished: bool = False,
    ) -> None:
        self.body = body
        self._view = view
        if view is not None:
            job_id, client_id, version = view.job_id, view.client_id, view.version
            finished = view.finished
        self.job_id = job_id
        self.client_id = client_id
        self.version = version
        # Finished jobs never change: their answers carry no poll-interval hint.
        self.finished = finished

    @classmethod
    def of(cls, view: JobView) -> CachedJob:
        return cls(view=view, body=view.to_json())

    @property
    def view(self) -> JobView:
        if self._view is None:
            self._view = JobView.model_validate_json(self.body)
        return self._view

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CachedJob):
            return NotImplemented
        return self.body == other.body

    def __hash__(self) -> int:
        return hash(self.body)

    def __repr__(self) -> str:
        return f"CachedJob(job_id={self.job_id}, version={self.version}, body={self.body!r})"


# -- effects (what the core asks a driver to do) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadEntry:
    """Run the READ_JOB script. A driver may hedge: answer `Hedged` after `hedge_seconds`
    without a Redis answer, and settle the ticket with the late answer itself."""

    job_id: int
    token: str
    ticket: Ticket


@dataclass(frozen=True, slots=True)
class LoadJob:
    """Read the job from the DB. `fill`: the row goes into the cache (the lease holder's
    read); otherwise it only answers this read, and a driver may share one DB read
    between such loads of the same job (never with a load started before this read)."""

    job_id: int
    fill: bool = False


@dataclass(frozen=True, slots=True)
class FillEntry:
    """Fill after a DB read; `view=None` fills a tombstone."""

    job_id: int
    token: str
    rev: str
    view: JobView | None


@dataclass(frozen=True, slots=True)
class DropEntry:
    """Drop the job's entry, seal and lease (the floor stays)."""

    job_id: int


@dataclass(frozen=True, slots=True)
class DropKey:
    """Drop one key that holds a value of the wrong Redis type."""

    key: str


@dataclass(frozen=True, slots=True)
class Probe:
    """Run the half-open probe (ping, then repair). True when Redis is back; a driver that
    runs it in the background answers False, and this read goes to the database."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Effect = ReadEntry | LoadJob | FillEntry | DropEntry | DropKey | Probe | Sleep


# -- results of Redis effects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """A value; `sealed` says whether its seal verified."""

    value: bytes
    sealed: bool


@dataclass(frozen=True, slots=True)
class Lease:
    """A miss; this reader holds the fill lease. `rev` is the revocation count it saw."""

    rev: str


@dataclass(frozen=True, slots=True)
class Busy:
    """A miss; another reader holds the lease for `pttl_ms` more."""

    pttl_ms: int


@dataclass(frozen=True, slots=True)
class Foreign:
    """A key the call touched holds a value of the wrong Redis type."""

    key: str


@dataclass(frozen=True, slots=True)
class Stored:
    stored: bool


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    kind: ErrorClass
    error: BaseException


@dataclass(frozen=True, slots=True)
class Hedged:
    """Redis did not answer within the hedge delay; the driver read the database."""

    view: JobView | None


ReadReply = Hit | Lease | Busy | Foreign | Failed | Hedged
WriteReply = Stored | Done | Foreign | Failed


# -- the result ----------------------------------------------------------------------------------


class Source(enum.Enum):
    CACHE = "cache"
    DATABASE = "database"


class Why(enum.Enum):
    HIT = "hit"
    TOMBSTONE = "tombstone"
    FILLED = "filled"  # lease holder: read the DB, then filled (or tried to)
    OFF = "off"  # breaker open or caching off
    FAILED = "failed"  # a Redis call failed
    HEDGED = "hedged"  # Redis slower than the hedge delay
    WAITED = "waited"  # waited for another reader's fill in vain
    RETRIES = "retries"  # kept meeting bad entries


@dataclass(frozen=True, slots=True)
class ReadResult:
    """What a read returned and why; `job` is None when there is no such job."""

    job: CachedJob | None
    source: Source
    why: Why


# -- the gate: permits, counts, error classes --------------------------------------------------


class Gate:
    """The pure decisions around each Redis call; thread-safe, no I/O."""

    def __init__(
        self,
        breaker: CircuitBreaker,
        counts: PendingCounts,
        *,
        clock: Callable[[], float] = time.monotonic,
        warn_every_seconds: float = 60.0,
    ) -> None:
        self.breaker = breaker
        self.counts = counts
        self._clock = clock
        self._warn_every = warn_every_seconds
        self._warned: dict[ErrorClass, float] = {}
        self._lock = threading.Lock()

    def admit(self) -> Ticket | None:
        return self.breaker.ticket()

    def count(self, field: str, amount: int = 1) -> None:
        self.counts.add(field, amount)

    def settle(self, ticket: Ticket | None, reply: object) -> None:
        """Report the outcome of a call made with `ticket` (None: no breaker outcome)."""
        if not isinstance(reply, Failed):
            if ticket is not None:
                self.breaker.success(ticket)
            return
        if reply.kind is ErrorClass.OVERLOAD:
            return  # our own pool is full: Redis is fine, this call alone degrades
        self.count("errors")
        if reply.kind is ErrorClass.UNAVAILABLE:
            if ticket is not None:
                self.breaker.failure(reply.error, ticket)
            return
        if ticket is not None:
            self.breaker.success(ticket)  # Redis answered: no outage
        self._warn(reply)

    def _warn(self, reply: Failed) -> None:
        """One WARNING per error class per minute, never the message (it may name hosts)."""
        now = self._clock()
        with self._lock:
            last = self._warned.get(reply.kind)
            if last is not None and now - last < self._warn_every:
                return
            self._warned[reply.kind] = now
        if reply.kind is ErrorClass.REFUSED:
            logger.warning(
                "Redis refuses work now (%s, e.g. OOM or BUSY): those reads go to the "
                "database; caching stays on",
                type(reply.error).__name__,
            )
        else:
            logger.warning(
                "bad data of ours in Redis (%s): dropped, caching stays on",
                type(reply.error).__name__,
            )


# -- the machine ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """The knobs of `read_job` (from `core.CachePolicy`)."""

    lease_seconds: float
    fill_grace_seconds: float
    max_wait_seconds: float
    max_attempts: int = 3
    first_poll_seconds: float = 0.002
    max_poll_seconds: float = 0.05


def decode(job_id: int, raw: bytes) -> CachedJob | None:
    """A sealed hit's bytes as a job of `job_id`, or None if they are not one.

    Only the fields a poll reads are checked here (see `CachedJob`); the bytes were
    sealed by this cache after full validation.
    """
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(fields) is not dict:
        return None
    found, client_id, version = fields.get("job_id"), fields.get("client_id"), fields.get("version")
    status = fields.get("status")
    if type(found) is not int or found != job_id:
        return None
    if type(client_id) is not str or type(version) is not int:
        return None
    finished = status in _FINISHED
    return CachedJob(
        body=raw, job_id=job_id, client_id=client_id, version=version, finished=finished
    )


_FINISHED = frozenset(status.value for status in FINISHED_STATUSES)

ReadMachine = Generator[Effect, Any, ReadResult]


def read_job(
    job_id: int,
    *,
    token: str,
    gate: Gate,
    policy: ReadPolicy,
    clock: Callable[[], float],
) -> ReadMachine:
    """One cached read of a job, as effects (see the module docstring)."""
    started = clock()
    delay = policy.first_poll_seconds
    attempts = 0
    while True:
        ticket = gate.admit()
        if ticket is not None and ticket.probe:
            back = yield Probe(ticket)
            ticket = gate.admit() if back else None
        if ticket is None:
            return (yield from _from_db(job_id, gate, Why.OFF))
        reply = yield ReadEntry(job_id, token, ticket)
        if isinstance(reply, Hedged):
            gate.count("misses")
            job = CachedJob.of(reply.view) if reply.view is not None else None
            return ReadResult(job, Source.DATABASE, Why.HEDGED)
        gate.settle(ticket, reply)
        if isinstance(reply, Failed):
            return (yield from _from_db(job_id, gate, Why.FAILED))
        if isinstance(reply, Hit):
            if reply.sealed and reply.value == TOMBSTONE:
                gate.count("hits")
                return ReadResult(None, Source.CACHE, Why.TOMBSTONE)
            cached = decode(job_id, reply.value) if reply.sealed else None
            if cached is not None:
                gate.count("hits")
                return ReadResult(cached, Source.CACHE, Why.HIT)
            logger.warning("dropped a corrupted cache entry (job %s)", job_id)
            gate.count("errors")
            yield from _redis(gate, DropEntry(job_id))
        elif isinstance(reply, Foreign):
            logger.warning("dropped a value of the wrong type (%s)", reply.key)
            gate.count("errors")
            yield from _redis(gate, DropKey(reply.key))
        elif isinstance(reply, Lease):
            view = yield LoadJob(job_id, fill=True)
            yield from _redis(gate, FillEntry(job_id, token, reply.rev, view))
            gate.count("misses")
            job = CachedJob.of(view) if view is not None else None
            return ReadResult(job, Source.DATABASE, Why.FILLED)
        else:
            assert isinstance(reply, Busy)
            now = clock()
            until = min(
                started + policy.max_wait_seconds,
                now + max(reply.pttl_ms, 0) / 1000 + policy.fill_grace_seconds,
            )
            if now >= until:
                return (yield from _from_db(job_id, gate, Why.WAITED))
            yield Sleep(min(delay, until - now))
            delay = min(delay * 2, policy.max_poll_seconds)
            continue
        attempts += 1
        if attempts >= policy.max_attempts:
            return (yield from _from_db(job_id, gate, Why.RETRIES))


def _from_db(job_id: int, gate: Gate, why: Why) -> ReadMachine:
    view = yield LoadJob(job_id)
    gate.count("misses")
    job = CachedJob.of(view) if view is not None else None
    return ReadResult(job, Source.DATABASE, why)


def _redis(gate: Gate, effect: Effect) -> Generator[Effect, Any, object]:
    """A Redis effect other than the read: skipped while the breaker says no."""
    ticket = gate.admit()
    if ticket is not None and ticket.probe:
        back = yield Probe(ticket)
        ticket = gate.admit() if back else None
    if ticket is None:
        return None
    reply = yield effect
    gate.settle(ticket, reply)
    if isinstance(reply, Foreign) and not isinstance(effect, DropKey):
        logger.warning("dropped a value of the wrong type (%s)", reply.key)
        gate.count("errors")
        yield from _redis(gate, DropKey(reply.key))
    return reply
