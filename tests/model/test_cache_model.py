"""The cache core, model-checked: any interleaving of readers, writers and faults.

`shared.cache.machine.read_job` is sans-IO, so a Hypothesis `RuleBasedStateMachine` can
step several reads one effect at a time, interleaved with writes (commit and pre-warm as
separate steps), invalidations, entry eviction, lease expiry, clock steps, Redis errors,
ambiguous timeouts, pauses and restarts (data lost), a database restore (a new
incarnation), and corrupt, wrong-type and foreign planted values. Redis is fakeredis
running the real Lua scripts; the database is a dict. Invariants after every step:

1. a read that starts after a write's pre-warm returned never gets an older version
   (while no fault was injected since that pre-warm);
2. no step ever stores an entry older than a version this Redis already stored for that
   job (same incarnation, same Redis lifetime);
3. no client ever receives another client's job;
4. at most one DB read per job per lease period while Redis is healthy;
5. with no fault injected, the statistics equal the model's counts exactly (checked
   also after errors, ambiguous timeouts and pauses: only a restart loses counts).

Budget: `MODEL_EXAMPLES` (default 200, derandomized) in `make test`; `make fuzz` runs
a long randomized budget.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fakeredis
import orjson
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shared.cache import CachePolicy, CircuitBreaker, JobCache, KeySpace
from shared.cache.backend import CallFailed, RedisBackend
from shared.cache.breaker import State
from shared.cache.errors import ErrorClass
from shared.cache.machine import (
    CachedJob,
    Effect,
    Failed,
    FillEntry,
    Lease,
    LoadJob,
    Probe,
    ReadEntry,
    ReadResult,
    Sleep,
    Source,
    Why,
)
from shared.cache.seal import Sealer
from shared.schemas import JobStatus, JobView, ProgressInfo, Stage

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "200"))
STEPS = int(os.environ.get("MODEL_STEPS", "40"))
DERANDOMIZE = os.environ.get("MODEL_RANDOM", "") == ""

JOBS = (1, 2)
# Rules pick job 1 more often: short sequences that meet on one job are what break things.
JOB = st.sampled_from((1, 1, 1, 2))
CLIENTS = ("alice", "bob")
LEASE_MS = 60_000  # leases lapse only when the model says so (rule `expire_leases`)
LEASE_S = LEASE_MS / 1000
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def view(job_id: int, client: str, version: int) -> JobView:
    return JobView(
        job_id=job_id,
        client_id=client,
        status=JobStatus.RUNNING if version > 1 else JobStatus.QUEUED,
        progress=ProgressInfo(
            current_stage=Stage.RENDERING if version > 1 else Stage.QUEUED,
            scenes_completed=min(version - 1, 1_000),
            scenes_total=1_000,
            percent=0.0,
        ),
        version=version,
        created_at=NOW,
        updated_at=NOW,
    )


class FaultyBackend:
    """A `RedisBackend` whose next calls fail on demand.

    `armed`: failures for the next calls, each `("refused" | "unavailable", applied)`;
    `applied=True` is an ambiguous timeout: the call ran in Redis, its answer was lost.
    `paused`: every call fails (times out) without running.
    """

    RESULT_METHODS = frozenset(
        {
            "read_job",
            "read_jobs",
            "fill_job",
            "fill_missing",
            "write_job",
            "drop_job",
            "drop_keys",
            "read_list",
            "fill_list",
            "counters",
        }
    )

    def __init__(self, inner: RedisBackend) -> None:
        self.inner = inner
        self.sealer = inner.sealer
        self.armed: list[tuple[str, bool]] = []
        self.paused = False

    def _fault(self) -> tuple[Failed, bool] | None:
        if self.paused:
            return Failed(ErrorClass.UNAVAILABLE, redis.TimeoutError("paused")), False
        if not self.armed:
            return None
        kind, applied = self.armed.pop(0)
        if kind == "refused":
            return Failed(ErrorClass.REFUSED, redis.ResponseError("OOM")), applied
        return Failed(ErrorClass.UNAVAILABLE, redis.TimeoutError("timeout")), applied

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method) or name in ("read_reply", "read_job_culprit", "close"):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            fault = self._fault()
            if fault is None:
                return method(*args, **kwargs)
            failed, applied = fault
            if applied:
                method(*args, **kwargs)
            if name in ("flush_stats", "read_jobs"):
                return [failed] * len(args[0])
            if name in self.RESULT_METHODS:
                return failed
            raise CallFailed(failed)

        return call


@dataclass
class Reader:
    cache: JobCache
    job_id: int
    client: str
    machine: Any
    effect: Effect | None
    started: float
    # The version acknowledged by a pre-warm when the read started (invariant 1).
    floor: int
    faults_at_start: int
    incarnation: str
    owner_at_start: str | None
    loads: int = 0
    # The version committed in the database when the read started: an answer read from
    # the database is never older, faults or not (the asyncio driver's shared DB reads).
    db_floor: int = 0
    start_no: int = 0  # the model's event count when the read started
    result: ReadResult | None = None
    holds_lease: bool = False
    lease_period: int = -1  # the lease period its lease belongs to
    owners: set[str | None] = field(default_factory=set)  # owners while it ran


@dataclass
class PendingWrite:
    view: JobView
    cache_index: int


@dataclass
class Period:
    """DB reads of one job since its lease was last freed (invariant 4)."""

    number: int = 0
    loads: int = 0
    faults: int = 0


@dataclass
class World:
    jobs: dict[int, JobView] = field(default_factory=dict)


class CacheModel(RuleBasedStateMachine):
    """Drives `JobCache`'s sans-IO core against a reference model (see module docstring)."""

    @initialize(groups=st.sets(st.sampled_from(("faults", "plants", "restore", "time", "share"))))
    def swarm(self, groups: set[str]) -> None:
        """Swarm testing: each example enables a subset of the disturbing rule groups, so
        that plain interleavings of reads and writes are not drowned by faults. "share":
        DB reads that only answer take the newest shareable row, as the asyncio driver
        does (`share_db_read`)."""
        self.setup()
        self.groups = groups

    def setup(self) -> None:
        self.server = fakeredis.FakeServer()
        self.client = fakeredis.FakeRedis(server=self.server)
        self.keys = KeySpace(namespace="m:")
        self.sealer = Sealer(b"model secret")
        self.clock = Clock()
        self.incarnation = "db-1"
        self.restores = 0
        self.db: dict[int, JobView] = {j: view(j, CLIENTS[j % 2], 1) for j in JOBS}
        self.faults = 0  # every injected fault bumps this
        self.restarts = 0
        self.backends: list[FaultyBackend] = []
        self.caches: list[JobCache] = [self._cache(), self._cache()]
        self.readers: list[Reader] = []
        self.retired: list[JobCache] = []  # caches of processes from before a restore
        self.writes: list[PendingWrite] = []
        self.acked: dict[int, int] = {}  # job -> newest version whose pre-warm returned
        self.acked_faults: dict[int, int] = {}  # job -> faults count at that ack
        self.seen: dict[tuple[int, str], int] = {}  # (job, inc) -> newest version stored
        self.lease_granted: dict[int, float] = {}  # job -> clock at grant
        self.period_numbers = 0
        self.periods: dict[int, Period] = {j: Period() for j in JOBS}
        self.served = {"hits": 0, "misses": 0}
        self.db_loads = 0
        # Events (read starts, DB reads) in order, and the DB reads that answer a request
        # only (LoadJob(fill=False)): (cache, job, event number, row) -- what the asyncio
        # driver lets overlapping reads share.
        self.events = 0
        self.answer_loads: list[tuple[JobCache, int, int, JobView | None]] = []

    def _cache(self) -> JobCache:
        inner = RedisBackend(fakeredis.FakeRedis(server=self.server), self.keys, self.sealer)
        backend = FaultyBackend(inner)
        self.backends.append(backend)
        return JobCache(
            backend=backend,
            keys=self.keys,
            load_job=self._load,
            write_progress=None,
            recent_jobs=lambda since: [(j, v.client_id) for j, v in self.db.items()],
            policy=CachePolicy(
                lease_ms=LEASE_MS,
                fill_grace_seconds=0.25,
                incarnation=self.incarnation,
                stats_flush_seconds=1e9,
            ),
            breaker=CircuitBreaker(threshold=1, reset_seconds=1.0, clock=self.clock),
            clock=self.clock,
        )

    def _load(self, job_id: int) -> JobView | None:
        self.db_loads += 1
        return self.db.get(job_id)

    def _fault(self) -> None:
        self.faults += 1

    def _free_lease_period(self, job_id: int) -> None:
        self.period_numbers += 1
        self.periods[job_id] = Period(number=self.period_numbers, faults=self.faults)

    # -- reads ------------------------------------------------------------------------------

    @precondition(lambda self: sum(r.result is None for r in self.readers) < 3)
    @rule(
        cache=st.integers(0, 1),
        job_id=st.sampled_from((1, 1, 1, 2, 9)),
        client=st.sampled_from(CLIENTS),
    )
    def start_read(self, cache: int, job_id: int, client: str) -> None:
        machine = self.caches[cache].machine(job_id)
        owner = self.db.get(job_id)
        self.events += 1
        reader = Reader(
            cache=self.caches[cache],
            job_id=job_id,
            client=client,
            machine=machine,
            effect=None,
            started=self.clock.now,
            floor=self.acked.get(job_id, 0),
            faults_at_start=self.faults,
            incarnation=self.incarnation,
            owner_at_start=owner.client_id if owner else None,
            db_floor=owner.version if owner else 0,
            start_no=self.events,
        )
        reader.owners.add(reader.owner_at_start)
        self._advance(reader, None)
        self.readers.append(reader)

    @precondition(
        lambda self: "share" in self.groups and sum(r.result is None for r in self.readers) < 3
    )
    @rule(cache=st.integers(0, 1), job_id=JOB, client=st.sampled_from(CLIENTS))
    def read_during_an_outage(self, cache: int, job_id: int, client: str) -> None:
        """The process's breaker is open (an outage it saw): the read needs the DB only to
        answer -- the reads whose DB reads the asyncio driver shares."""
        if self.caches[cache].breaker.available:
            self._fault()
            self.caches[cache].breaker.failure(OSError("an outage this process saw"))
        self.start_read(cache, job_id, client)

    @rule(
        cache=st.integers(0, 1),
        job_id=st.sampled_from((1, 1, 1, 2, 9)),
        client=st.sampled_from(CLIENTS),
    )
    def quick_read(self, cache: int, job_id: int, client: str) -> None:
        """A read that runs to its end with nothing interleaved (unless it must wait)."""
        self.start_read(cache, job_id, client)
        reader = self.readers[-1]
        for _ in range(20):
            if reader.result is not None:
                return
            self._step(reader)

    def _advance(self, reader: Reader, reply: object) -> None:
        try:
            reader.effect = reader.machine.send(reply)
        except StopIteration as stop:
            reader.effect = None
            reader.result = stop.value
            self._finished(reader)

    @precondition(lambda self: any(r.result is None for r in self.readers))
    @rule(pick=st.integers(0, 7))
    def step_read(self, pick: int) -> None:
        live = [r for r in self.readers if r.result is None]
        self._step(live[pick % len(live)])

    def _step(self, reader: Reader) -> None:
        effect = reader.effect
        assert effect is not None
        cache = reader.cache
        if "share" in self.groups and self.share_db_read(reader, -1):
            return
        if isinstance(effect, LoadJob):
            reader.loads += 1
            period = self.periods.get(effect.job_id)
            if period is not None and reader.holds_lease and reader.lease_period == period.number:
                period.loads += 1
            reply: object = self._load(effect.job_id)
            if not effect.fill:
                self.events += 1
                self.answer_loads.append((cache, effect.job_id, self.events, reply))  # type: ignore[arg-type]
        elif isinstance(effect, Sleep):
            self._tick(effect.seconds)
            reply = None
        elif isinstance(effect, Probe):
            reply = cache.recover(effect.ticket)
        else:
            reply = cache._perform(effect)
            if isinstance(effect, ReadEntry):
                reader.holds_lease = isinstance(reply, Lease)
                if reader.holds_lease:
                    self.lease_granted.setdefault(effect.job_id, self.clock.now)
                    period = self.periods.get(effect.job_id)
                    reader.lease_period = period.number if period is not None else -1
            if isinstance(effect, FillEntry):
                self.lease_granted.pop(effect.job_id, None)
                self._free_lease_period(effect.job_id)
        self._advance(reader, reply)

    def share_db_read(self, reader: Reader, which: int) -> bool:
        """The asyncio driver: a read that needs the DB only to answer takes the row of
        another such DB read of the same job in the same process -- one begun after this
        read started (`AsyncJobReader._load`; any of them may still be in flight, as far
        as the model knows). False when there is none to share."""
        effect = reader.effect
        if not isinstance(effect, LoadJob) or effect.fill:
            return False
        shareable = [
            row
            for cache, job_id, number, row in self.answer_loads
            if cache is reader.cache and job_id == reader.job_id and number >= reader.start_no
        ]
        if not shareable:
            return False
        self._advance(reader, shareable[which % len(shareable)])
        return True

    @precondition(lambda self: any(isinstance(r.effect, ReadEntry) for r in self.readers))
    @rule(cache=st.integers(0, 1), picks=st.sets(st.integers(0, 7), min_size=1))
    def batch_waiting_reads(self, cache: int, picks: set[int]) -> None:
        """The asyncio reader's batching: some of one process's waiting reads (which ones
        is Hypothesis's choice) go to Redis as one READ_JOBS call."""
        waiting = [
            r
            for r in self.readers
            if isinstance(r.effect, ReadEntry) and r.cache is self.caches[cache]
        ]
        if waiting:
            self._batch(
                list({id(r): r for r in (waiting[i % len(waiting)] for i in picks)}.values())
            )

    @precondition(lambda self: sum(r.result is None for r in self.readers) < 4)
    @rule(
        cache=st.integers(0, 1),
        reads=st.lists(
            st.tuples(st.sampled_from((*JOBS, 9)), st.sampled_from(CLIENTS)), min_size=2, max_size=5
        ),
        cuts=st.sets(st.integers(1, 4)),
    )
    def batched_reads(self, cache: int, reads: list[tuple[int, str]], cuts: set[int]) -> None:
        """Reads that start in one event-loop tick, cut into batches where Hypothesis says;
        what follows their first Redis read is stepped like any other read."""
        started = []
        for job_id, client in reads:
            self.start_read(cache, job_id, client)
            if isinstance(self.readers[-1].effect, ReadEntry):
                started.append(self.readers[-1])
        edges = [0, *sorted(c for c in cuts if c < len(started)), len(started)]
        for low, high in itertools.pairwise(edges):
            if high > low:
                self._batch(started[low:high])

    def _batch(self, batch: list[Reader]) -> None:
        policy = batch[0].cache.policy
        backend = batch[0].cache.backend
        assert backend is not None
        effects = [r.effect for r in batch]
        reads = []
        for effect in effects:
            assert isinstance(effect, ReadEntry)
            reads.append((effect.job_id, effect.token))
        replies = backend.read_jobs(reads, policy.lease_ms, policy.incarnation)  # type: ignore[attr-defined]
        assert len(replies) == len(batch)
        for reader, (job_id, _), reply in zip(batch, reads, replies, strict=True):
            reader.holds_lease = isinstance(reply, Lease)
            if reader.holds_lease:
                self.lease_granted.setdefault(job_id, self.clock.now)
            self._advance(reader, reply)

    def _finished(self, reader: Reader) -> None:
        result = reader.result
        assert result is not None
        if result.source is Source.CACHE:
            self.served["hits"] += 1
        else:
            self.served["misses"] += 1
        job = result.job
        if job is None:
            return
        # 3. never another client's job: what we serve is the job of the asked id, owned
        # by its owner in the database (before or after a restore during the read).
        assert job.view.job_id == reader.job_id
        owners = {*reader.owners, self.db[reader.job_id].client_id}
        assert job.view.client_id in owners, f"served {job.view.client_id}'s job to {owners}"
        # 1. fresh after write: an answer from the database is never older than what the
        # database held when the read started; one from the cache, only without faults.
        if result.source is Source.DATABASE and reader.incarnation == self.incarnation:
            assert job.view.version >= reader.db_floor, (
                f"read of job {reader.job_id} got v{job.view.version} from the database, "
                f"which held v{reader.db_floor} when the read started"
            )
        if (
            reader.incarnation == self.incarnation
            and self.faults == reader.faults_at_start
            and self.acked_faults.get(reader.job_id, -1) == reader.faults_at_start
        ):
            assert job.view.version >= reader.floor, (
                f"read of job {reader.job_id} got v{job.view.version} after "
                f"v{reader.floor}'s pre-warm returned"
            )

    # -- writes -----------------------------------------------------------------------------

    @rule(job_id=JOB, cache=st.integers(0, 1))
    def commit(self, job_id: int, cache: int) -> None:
        """A write commits in the database; its pre-warm is a later step."""
        current = self.db[job_id]
        new = view(job_id, current.client_id, current.version + 1)
        self.db[job_id] = new
        self.writes.append(PendingWrite(new, cache))

    @precondition(lambda self: bool(self.writes))
    @rule(pick=st.integers(0, 3))
    def prewarm(self, pick: int) -> None:
        write = self.writes.pop(pick % len(self.writes))
        faults = self.faults
        returned = self.caches[write.cache_index].publish(write.view)
        self._free_lease_period(write.view.job_id)
        self.lease_granted.pop(write.view.job_id, None)
        if (
            returned
            and write.view.version > self.acked.get(write.view.job_id, 0)
            and self.db[write.view.job_id].client_id == write.view.client_id
            and faults == self.faults
        ):
            self.acked[write.view.job_id] = write.view.version
            self.acked_faults[write.view.job_id] = self.faults

    @rule(job_id=JOB, cache=st.integers(0, 1))
    def write(self, job_id: int, cache: int) -> None:
        """A whole write: commit, then its pre-warm, with nothing in between."""
        self.commit(job_id, cache)
        self.prewarm(len(self.writes) - 1)

    @rule(job_id=JOB, cache=st.integers(0, 1))
    def invalidate(self, job_id: int, cache: int) -> None:
        self.caches[cache].invalidate_job(job_id)
        self._free_lease_period(job_id)
        self.lease_granted.pop(job_id, None)

    # -- time and Redis's own behaviour -----------------------------------------------------

    def _tick(self, seconds: float) -> None:
        self.clock.now += seconds
        for job_id, granted in list(self.lease_granted.items()):
            if self.clock.now - granted >= LEASE_S:
                self._expire_lease(job_id)

    def _expire_lease(self, job_id: int) -> None:
        self.client.delete(self.keys.lease(job_id))
        self.lease_granted.pop(job_id, None)
        self._free_lease_period(job_id)

    @precondition(lambda self: "time" in self.groups)
    @rule(seconds=st.sampled_from((0.01, 0.3, 1.5, 61.0)))
    def clock_step(self, seconds: float) -> None:
        self._tick(seconds)

    @precondition(lambda self: "time" in self.groups)
    @rule(job_id=JOB)
    def expire_lease(self, job_id: int) -> None:
        """A lease holder died: its lease lapses."""
        self._expire_lease(job_id)

    @rule(job_id=JOB)
    def evict(self, job_id: int) -> None:
        """maxmemory eviction of the entry alone."""
        self.client.delete(self.keys.job(job_id))
        self._free_lease_period(job_id)

    # -- faults ----------------------------------------------------------------------------

    @precondition(lambda self: "faults" in self.groups)
    @rule(
        cache=st.integers(0, 1),
        kind=st.sampled_from(("unavailable", "refused")),
        applied=st.booleans(),
    )
    def redis_error(self, cache: int, kind: str, applied: bool) -> None:
        self._fault()
        self.backends[-2 + cache].armed.append((kind, applied))

    @precondition(lambda self: "faults" in self.groups)
    @rule(cache=st.integers(0, 1))
    def breaker_opens(self, cache: int) -> None:
        """A process saw an outage: its reads answer from the DB until its probe."""
        self._fault()
        self.caches[cache].breaker.failure(OSError("an outage this process saw"))

    @precondition(lambda self: "faults" in self.groups)
    @rule()
    def pause(self) -> None:
        self._fault()
        for backend in self.backends:
            backend.paused = True

    @precondition(lambda self: "faults" in self.groups)
    @rule()
    def resume(self) -> None:
        for backend in self.backends:
            backend.paused = False

    @precondition(lambda self: "faults" in self.groups)
    @rule()
    def restart(self) -> None:
        """Redis restarts without persistence: data and scripts are gone."""
        self._fault()
        self.restarts += 1
        self.client.flushall()
        self.client.script_flush()
        self.seen.clear()
        self.lease_granted.clear()
        for job_id in JOBS:
            self._free_lease_period(job_id)

    @precondition(lambda self: "restore" in self.groups)
    @rule()
    def restore_database(self) -> None:
        """Another database (restored, or recreated: ids and versions repeat, owners
        differ) behind the same Redis."""
        self.restores += 1
        self.incarnation = f"db-{self.restores + 1}"
        self.db = {j: view(j, CLIENTS[(j + self.restores) % 2], 1) for j in JOBS}
        self.writes.clear()
        self.acked.clear()
        self.acked_faults.clear()
        self.retired.extend(self.caches)
        for reader in self.readers:
            if reader.result is None and reader.job_id in self.db:
                reader.owners.add(self.db[reader.job_id].client_id)
        self.caches = [self._cache(), self._cache()]
        for job_id in JOBS:
            self._free_lease_period(job_id)

    # -- planted values ---------------------------------------------------------------------

    @precondition(lambda self: "plants" in self.groups)
    @rule(job_id=JOB, what=st.sampled_from(("garbage", "wrongtype", "forged")))
    def plant(self, job_id: int, what: str) -> None:
        key = self.keys.job(job_id)
        if what == "garbage":
            self.client.set(key, b"\xff not json")
        elif what == "wrongtype":
            self.client.delete(key)
            self.client.hset(key, "x", "y")
        else:
            forged = view(job_id, "mallory", 10_000).to_json()
            self.client.set(key, forged)
            self.client.set(self.keys.seal(job_id), Sealer(b"another key").seal(key, forged))
        self._free_lease_period(job_id)

    # -- statistics ------------------------------------------------------------------------

    @rule(cache=st.integers(0, 1))
    def flush(self, cache: int) -> None:
        """The periodic flusher of one process runs now."""
        self.caches[cache].flush()

    @precondition(lambda self: "faults" in self.groups)
    @rule(cache=st.integers(0, 1))
    def flush_times_out(self, cache: int) -> None:
        """A flush lands in Redis but its answer times out (the batch is sent again)."""
        target = self.caches[cache]
        if not target._pending.due() or not target.breaker.available:
            return
        self._fault()
        self.backends[-2 + cache].armed.insert(0, ("unavailable", True))
        self.caches[cache].flush()
        if self.restarts == 0:
            self.statistics_are_exact()  # the batch is re-sent: it must land once

    @precondition(lambda self: self.restarts == 0)
    @rule()
    def statistics_are_exact(self) -> None:
        """5. The global statistics equal the model's counts exactly: with no fault, and
        also after errors, ambiguous timeouts and pauses (batches land once); only a
        restart without persistence loses counts (and says so: `since`)."""
        if any(b.paused or b.armed for b in self.backends):
            return
        caches = [*self.caches, *self.retired]
        if any(c.breaker.state is State.HALF_OPEN for c in caches):
            return  # a live read holds the one probe permit: nobody may call Redis yet
        self._tick(1.5)  # past the breaker's reset: a flush runs the probe first
        for cache in caches:
            assert any(cache.flush() for _ in range(3)), "a flush did not land"
        stats = self.caches[0].stats()["statistics"]
        assert isinstance(stats, dict)
        assert (stats["hits"], stats["misses"]) == (self.served["hits"], self.served["misses"])

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def nothing_older_than_a_stored_version_is_stored(self) -> None:
        """2. Entries never go below a version this Redis already stored (per incarnation)."""
        if not hasattr(self, "keys"):
            return
        for job_id in JOBS:
            key = self.keys.job(job_id)
            if self.client.type(key) not in (b"string", "string"):
                continue
            raw: Any = self.client.get(key)
            seal: Any = self.client.get(self.keys.seal(job_id))
            if not raw or not self.sealer.verify(key, raw, seal):
                continue  # a tombstone, or a planted value (never served: invariant 3)
            version = int(orjson.loads(raw)["version"])
            inc: Any = self.client.hget(self.keys.floor(job_id), "inc")
            inc_text = inc.decode() if inc is not None else ""
            seen = self.seen.get((job_id, inc_text), 0)
            assert version >= seen, f"job {job_id}: v{version} stored after v{seen}"
            self.seen[(job_id, inc_text)] = version

    @invariant()
    def one_db_read_per_lease_period_while_healthy(self) -> None:
        """4. While Redis is healthy, a job's lease admits one DB read per period."""
        if not hasattr(self, "periods"):
            return
        for job_id, period in self.periods.items():
            if period.faults == self.faults:
                assert period.loads <= 1, f"job {job_id}: {period.loads} DB reads in one period"

    def teardown(self) -> None:
        if hasattr(self, "caches"):
            for cache in [*self.caches, *self.retired]:
                cache.breaker = CircuitBreaker()  # no probes at close


TestCacheModel = CacheModel.TestCase
TestCacheModel.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=DERANDOMIZE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_the_model_notices_a_served_foreign_job() -> None:
    """The checker can fail: a read result naming another owner trips invariant 3."""
    model = CacheModel()
    model.setup()
    reader = Reader(model.caches[0], 1, "bob", None, None, 0.0, 0, 0, "db-1", "bob")
    reader.result = ReadResult(
        job=CachedJob.of(view(1, "mallory", 1)),
        source=Source.CACHE,
        why=Why.HIT,
    )
    with pytest.raises(AssertionError):
        model._finished(reader)


def test_the_model_notices_a_db_read_shared_with_a_later_read() -> None:
    """The checker can fail: a read that starts after a commit and takes the row of a DB
    read from before it (what `AsyncJobReader._load` must never do) trips invariant 1."""
    model = CacheModel()
    model.setup()
    model.groups = set()
    model.caches[0].breaker.failure(OSError("down"))  # open: reads answer from the DB
    model.start_read(0, 1, "bob")
    early = model.readers[-1]
    assert isinstance(early.effect, LoadJob) and not early.effect.fill
    model._step(early)  # its DB read: v1
    model.commit(1, 0)  # v2 committed
    model.start_read(0, 1, "bob")
    late = model.readers[-1]
    assert not model.share_db_read(late, 0)  # v1 is not shareable: begun before the read
    # As if the driver shared a DB read begun before this read:
    model.answer_loads = [(c, j, late.start_no, row) for c, j, _, row in model.answer_loads]
    with pytest.raises(AssertionError, match="from the database"):
        model.share_db_read(late, 0)
