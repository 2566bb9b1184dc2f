"""Interleavings found by the model (`tests/model/`), replayed on the real Redis and
PostgreSQL, so the fakes the model runs on are checked too.

Each replay steps the sans-IO read machine by hand (`JobCache.machine` and
`JobCache._perform`) exactly as the shortest failing sequence did on the code before the
fixes; the comment on each test says which defect it caught.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.cache import CachePolicy, CircuitBreaker, JobCache, KeySpace
from shared.cache.backend import RedisBackend, connect
from shared.cache.machine import Done, LoadJob, ReadEntry, ReadResult, Source
from shared.cache.stats import Batch
from shared.db import build_engine, build_session_factory
from shared.schemas import JobView
from tests.cache_helpers import STEPS, new_job, write_db_only

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
def sessions(pg_url: str) -> Iterator[Any]:
    engine = build_engine(pg_url, pool_size=2, max_overflow=0)
    yield build_session_factory(engine)
    engine.dispose()


@pytest.fixture
def world(redis_url: str, namespace: str, sessions: Any) -> Iterator[Any]:
    clients: list[Any] = []

    def cache(incarnation: str = "") -> JobCache:
        client = connect(redis_url, socket_timeout=5.0)
        clients.append(client)
        keys = KeySpace(namespace=f"{namespace}:")

        def load(job_id: int) -> JobView | None:
            from shared import jobs

            with sessions() as session:
                return jobs.get_job(job_id, session=session)

        return JobCache(
            backend=RedisBackend(client, keys),
            keys=keys,
            load_job=load,
            policy=CachePolicy(lease_ms=30_000, incarnation=incarnation),
            breaker=CircuitBreaker(),
        )

    yield cache
    for client in clients:
        client.close()


def run_until(cache: JobCache, machine: Any, stop: type) -> tuple[Any, object]:
    """Step `machine` on `cache` until it yields an effect of type `stop` (not performed)."""
    effect = machine.send(None)
    while not isinstance(effect, stop):
        effect = machine.send(cache._perform(effect))
    return effect, None


def finish(cache: JobCache, machine: Any, reply: object) -> ReadResult:
    """Answer the pending effect with `reply`, then run `machine` to its result."""
    try:
        while True:
            reply = cache._perform(machine.send(reply))
    except StopIteration as stop:
        result = stop.value
        assert isinstance(result, ReadResult)
        return result


def test_replay_a_fill_after_a_write_and_an_eviction_is_refused(world: Any, sessions: Any) -> None:
    """Defect 1 (stale fill while healthy): lease, DB read of v1, write v2 + pre-warm,
    eviction of the entry, then the v1 fill. Before: v1 was stored and served."""
    reader, writer = world(), world()
    job = new_job(sessions)
    machine = reader.machine(job.job_id)
    run_until(reader, machine, LoadJob)
    v1 = reader._load_job(job.job_id)
    v2 = write_db_only(sessions, job.job_id, STEPS[0])
    assert writer.publish(v2)
    writer.backend.client.delete(writer.keys.job(job.job_id))
    result = finish(reader, machine, v1)
    assert result.job is not None and result.job.view.version == 1
    fresh = writer.read(job.job_id)
    assert fresh.job is not None and fresh.job.view.version == 2


def test_replay_a_late_fill_is_stored_and_nothing_older_follows(world: Any, sessions: Any) -> None:
    """Defect 2 (cold keys under a slow DB): the first filler's lease lapses during its DB
    read, a second reader takes a new lease; the first fill lands late. Before: refused,
    and every wave went to the DB."""
    a, b = world(), world()
    job = new_job(sessions)
    first = a.machine(job.job_id)
    run_until(a, first, LoadJob)
    a.backend.client.delete(a.keys.lease(job.job_id))
    second = b.machine(job.job_id)
    run_until(b, second, LoadJob)
    view = a._load_job(job.job_id)
    assert finish(a, first, view).source is Source.DATABASE
    hit = a.read(job.job_id)
    assert hit.source is Source.CACHE, "the late fill was stored"
    assert finish(b, second, view).job is not None
    assert b.read(job.job_id).source is Source.CACHE


def test_replay_an_entry_of_another_database_is_never_served(world: Any, sessions: Any) -> None:
    """Defect 10 (incarnation): Redis kept a v1 of job N from database A; database B (a
    restore) has job N with another owner. Before: served A's entry to B's readers."""
    old = world("db-a")
    job = new_job(sessions, "alice@example.com")
    assert old.read(job.job_id).source is Source.DATABASE
    assert old.read(job.job_id).source is Source.CACHE
    new = world("db-b")
    # Database B: the same id and version, another owner.
    with sessions() as session:
        from shared.models import Job

        row = session.get(Job, job.job_id)
        row.client_id = "bob@example.com"
        session.commit()
    got = new.get(job.job_id, client_id="alice@example.com")
    assert got is None, "alice read a job of the previous database"
    mine = new.read(job.job_id)
    assert mine.job is not None and mine.job.view.client_id == "bob@example.com"


def test_replay_a_batch_resent_after_a_timeout_counts_once(world: Any) -> None:
    """Defect 4 (exact statistics): the same batch sent twice (an ambiguous timeout, then
    the retry) is counted once by the real server."""
    cache = world()
    backend = cache.backend
    assert isinstance(backend, RedisBackend)
    batch = Batch("replay-1", (("hits", 3), ("misses", 2)))
    assert backend.flush_stats([batch]) == [Done()]
    assert backend.flush_stats([batch]) == [Done()]
    counters = backend.counters()
    assert isinstance(counters, tuple)
    assert counters[0] == {"hits": 3, "misses": 2}
    assert counters[1] is not None, "the counters say since when they run"


def test_replay_an_unknown_id_is_a_tombstone_until_the_create(world: Any, sessions: Any) -> None:
    """Defect 9 (negative caching): the second poll of an unknown id is a cache hit; the
    create's pre-warm replaces the tombstone."""
    cache = world()
    job = new_job(sessions)
    unknown = job.job_id + 1
    assert cache.read(unknown).source is Source.DATABASE
    again = cache.read(unknown)
    assert again.job is None and again.source is Source.CACHE
    created = new_job(sessions)
    assert created.job_id == unknown
    assert cache.publish(created)
    got = cache.read(unknown)
    assert got.job is not None and got.source is Source.CACHE


def test_the_engine_sets_the_statement_timeout(pg_url: str) -> None:
    """Defect 2: the lease outlasts the DB statement timeout, which the engine sets."""
    engine = build_engine(pg_url, pool_size=1, max_overflow=0, statement_timeout_ms=1_234)
    try:
        with engine.connect() as conn:
            value = conn.exec_driver_sql("SHOW statement_timeout").scalar()
        assert value == "1234ms"
    finally:
        engine.dispose()


def test_read_entry_effects_name_their_ticket(world: Any, sessions: Any) -> None:
    """The machine asks for a Redis read with the breaker ticket it was permitted by."""
    cache = world()
    machine = cache.machine(new_job(sessions).job_id)
    effect = machine.send(None)
    assert isinstance(effect, ReadEntry)
    assert effect.ticket.generation == cache.breaker.generation
    machine.close()
