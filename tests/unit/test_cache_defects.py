"""Deterministic reproductions of the holes a line-by-line review of the cache found.

Each test drives one interleaving by hand (on fakeredis, which runs the real Lua scripts
through lupa) and failed on the code before the fix; README "The cache and its
guarantees" says what each guarantee means now.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import orjson
import pytest
import redis

from shared.cache.breaker import CircuitBreaker, State
from tests.cache_helpers import (
    STEPS,
    FakeClock,
    Harness,
    Make,
    make_harness,
    open_db,
    run_threads,
    state_of,
    write_db_only,
)

pytestmark = [pytest.mark.timeout(120)]

ALICE = "alice@example.com"


class FaultyClient:
    """A fakeredis client whose pipelines can be made to misbehave once, on demand.

    `before(pipe)` runs before a pipeline executes (to block it); `after` is an exception
    raised after it executed (an ambiguous timeout: the commands landed, the answer did not);
    `instead` is an exception raised instead of executing (nothing landed).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.before: Callable[[], None] | None = None
        self.after: BaseException | None = None
        self.instead: BaseException | None = None
        # (exception, predicate on the pipeline's arguments): raised after the first
        # pipeline the predicate accepts has executed.
        self.after_if: tuple[BaseException, Callable[[list[Any]], bool]] | None = None

    def pipeline(self, transaction: bool = True) -> Any:
        return _FaultyPipeline(self, self.inner.pipeline(transaction=transaction))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _FaultyPipeline:
    def __init__(self, owner: FaultyClient, inner: Any) -> None:
        self._owner = owner
        self._inner = inner

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner
        before, owner.before = owner.before, None
        if before is not None:
            before()
        instead, owner.instead = owner.instead, None
        if instead is not None:
            self._inner.reset()
            raise instead
        sent = [arg for command in self._inner.command_stack for arg in command[0]]
        result = self._inner.execute(*args, **kwargs)
        after, owner.after = owner.after, None
        if after is not None:
            raise after
        if owner.after_if is not None:
            exc, accepts = owner.after_if
            if accepts(sent):
                owner.after_if = None
                raise exc
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Any]:
    engine, sessions = open_db(sqlite_url)
    yield sessions
    engine.dispose()


@pytest.fixture
def make(server: fakeredis.FakeServer, db: Any) -> Make:
    def build(**options: Any) -> Harness:
        options.setdefault("reset_seconds", 5.0)
        return make_harness(
            lambda: FaultyClient(fakeredis.FakeRedis(server=server)), db, "dfx", **options
        )

    return build


@pytest.fixture
def h(make: Make) -> Harness:
    return make()


def served(h: Harness) -> int:
    counts = h.counts()
    return int(counts["hits"]) + int(counts["misses"])


# -- 1. stale fill while Redis is healthy ---------------------------------------------------------


@pytest.mark.parametrize("vanish", ["evicted", "dropped as corrupt"])
def test_a_fill_cannot_install_an_older_version_after_the_entry_vanished(
    make: Make, vanish: str
) -> None:
    reader = make(lease_ms=10_000)
    writer = reader.another()
    job = reader.new_job()
    loaded, release = threading.Event(), threading.Event()

    def slow_load(job_id: int) -> Any:
        view = reader.real_load(job_id)
        loaded.set()
        assert release.wait(30)
        return view

    reader.load.side_effect = slow_load
    result: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("job", reader.cache.get(job.job_id)), daemon=True
    )
    thread.start()
    assert loaded.wait(30)
    reader.load.side_effect = None
    # The reader holds v1 from the DB and the lease; a writer commits v2 and pre-warms it.
    assert writer.cache.update_progress(job.job_id, STEPS[0])
    assert writer.cached_version(job.job_id) == 2
    # Then the entry alone vanishes.
    if vanish == "evicted":
        writer.client.delete(writer.keys.job(job.job_id))
    else:
        writer.client.set(writer.keys.job(job.job_id), b"\xffgarbage")
        got = writer.cache.get(job.job_id)  # drops the bad entry, serves v2 from the DB
        assert got is not None and got.view.version == 2
        writer.client.delete(writer.keys.job(job.job_id))  # and its own fill is gone too
    release.set()
    thread.join(30)
    assert result["job"].view.version == 1  # the reader itself may answer what it read
    assert writer.cached_version(job.job_id) != 1, "a stale v1 was installed over v2"
    got = writer.cache.get(job.job_id)
    assert got is not None and got.view.version == 2


# -- 2. cold keys under a slow database ---------------------------------------------------------


def test_cold_polls_under_a_db_slower_than_the_lease_cost_at_most_two_db_reads(
    make: Make,
) -> None:
    h = make(lease_ms=400, real_clock=True)
    job = h.new_job()

    def slow_load(job_id: int) -> Any:
        time.sleep(0.6)
        return h.real_load(job_id)

    h.load.side_effect = slow_load
    results = run_threads(24, lambda _: h.cache.get(job.job_id))
    assert all(r is not None and r.view.version == 1 for r in results)
    assert h.load.call_count <= 2, f"{h.load.call_count} DB reads for one cold key"
    loads = h.load.call_count
    again = run_threads(24, lambda _: h.cache.get(job.job_id))
    assert all(r is not None for r in again)
    assert h.load.call_count == loads, "the next wave must be all hits"


# -- 3. late breaker outcomes ---------------------------------------------------------------------


def test_a_late_success_from_before_the_outage_does_not_close_the_breaker(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)  # cached
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        assert release.wait(30)

    h.client.before = hold
    thread = threading.Thread(target=lambda: h.cache.get(job.job_id), daemon=True)
    thread.start()
    assert entered.wait(30)
    # Meanwhile a call fails: the breaker opens.
    h.client.instead = redis.ConnectionError("refused")
    h.cache.get(job.job_id)
    assert state_of(h.cache) is State.OPEN
    release.set()  # the call permitted before the outage now succeeds, late
    thread.join(30)
    assert state_of(h.cache) is State.OPEN, "a late success closed the breaker with no probe"


def test_a_late_failure_does_not_reopen_the_breaker_after_a_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, reset_seconds=1.0, clock=clock)
    early = breaker.ticket()
    assert early is not None
    breaker.failure(RuntimeError("first"), early)
    clock.advance(1.5)
    probe = breaker.ticket()
    assert probe is not None and probe.probe
    breaker.success(probe)
    assert breaker.state is State.CLOSED
    breaker.failure(RuntimeError("late"), early)  # the early call reports twice, late
    assert breaker.state is State.CLOSED


# -- 4. exact statistics ------------------------------------------------------------------------


def test_an_ambiguous_timeout_does_not_count_twice(h: Harness) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)
    h.cache.get(job.job_id)
    h.client.instead = redis.ConnectionError("refused")
    h.cache.get(job.job_id)  # served by the DB: its counts wait in the process
    h.clock.advance(10)
    # The call that carries those counts lands, but its answer times out: the counts
    # are sent again later and must land once.
    stats_key = h.keys.stats()
    h.client.after_if = (
        redis.TimeoutError("timed out"),
        lambda args: any(str(a) == stats_key or a == stats_key.encode() for a in args),
    )
    reads = 3
    for _ in range(3):
        h.cache.get(job.job_id)
        reads += 1
        h.cache.stats()  # flushes this process's counts
        h.clock.advance(10)
    assert h.client.after_if is None, "the ambiguous timeout was not injected"
    h.cache.flush()
    assert served(h) == reads, h.counts()


def test_the_statistics_say_since_when_they_run_and_a_restart_is_visible(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)
    first = h.cache.stats()["statistics"]
    assert isinstance(first, dict) and first.get("since")
    h.client.inner.flushall()  # a Redis restart with no persistence
    time.sleep(1.1)
    h.cache.get(job.job_id)
    second = h.cache.stats()["statistics"]
    assert isinstance(second, dict)
    assert second["since"] != first["since"]


def test_a_bad_field_in_the_stats_hash_never_disables_caching(h: Harness) -> None:
    job = h.new_job()
    h.client.hset(h.keys.stats(), "hits", "not a number")
    for _ in range(4):
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 1
    assert h.load.call_count == 1, "reads must still be cached"
    assert state_of(h.cache) is State.CLOSED


# -- 5. error classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "BUSY Redis is busy running a script.",
    ],
)
def test_redis_refusing_writes_does_not_open_the_breaker(h: Harness, message: str) -> None:
    job = h.new_job()
    h.client.instead = redis.ResponseError(message)
    got = h.cache.get(job.job_id)
    assert got is not None and got.view.version == 1
    assert state_of(h.cache) is State.CLOSED
    assert h.cache.breaker.outages == 0


def test_readonly_is_an_outage(h: Harness) -> None:
    job = h.new_job()
    h.client.instead = redis.ReadOnlyError("READONLY You can't write against a read only replica.")
    got = h.cache.get(job.job_id)
    assert got is not None
    assert state_of(h.cache) is State.OPEN


# -- 8. publish only what was stored ------------------------------------------------------------


def test_a_refused_prewarm_is_not_published(h: Harness, db: Any) -> None:
    job = h.new_job()
    v2 = write_db_only(db, job.job_id, STEPS[0])
    v3 = write_db_only(db, job.job_id, STEPS[1])
    pubsub = h.client.inner.pubsub()
    pubsub.subscribe(h.keys.channel(job.job_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    h.cache.publish(v3)
    h.cache.publish(v2)  # late, older: refused by the compare-and-set
    got = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        got.append(orjson.loads(message["data"])["version"])
    pubsub.close()
    assert got == [3]


# -- 9. negative caching ------------------------------------------------------------------------


def test_an_unknown_id_is_cached_briefly_and_a_create_overrides_it(h: Harness) -> None:
    assert h.cache.get(9_999) is None
    assert h.cache.get(9_999) is None
    assert h.load.call_count == 1, "the second poll of an unknown id must not read the DB"
    job = h.new_job()  # the next id is unknown now: cache it as missing
    missing = job.job_id + 1
    assert h.cache.get(missing) is None
    created = h.new_job()
    assert created.job_id == missing
    h.cache.publish(created)  # what the API's create does
    got = h.cache.get(missing)
    assert got is not None and got.view.version == 1


def test_a_foreign_and_a_missing_job_take_the_same_path(h: Harness) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)
    h.cache.get(9_999)
    loads = h.load.call_count
    assert h.cache.get(job.job_id, client_id="mallory@example.com") is None
    assert h.cache.get(9_999, client_id="mallory@example.com") is None
    assert h.load.call_count == loads, "both answered from the cache"


# -- 10. the DB incarnation is part of the compare-and-set -------------------------------------


def test_entries_of_another_database_incarnation_never_block(
    server: fakeredis.FakeServer, db: Any
) -> None:
    old = make_harness(lambda: fakeredis.FakeRedis(server=server), db, "inc", incarnation="A")
    job = old.new_job()
    for step in STEPS[:4]:
        assert old.cache.update_progress(job.job_id, step)
    assert old.cached_version(job.job_id) == 5
    # The database is restored from a backup (the job is back at v1) while Redis is kept.
    with db() as session:
        from shared.models import Job

        row = session.get(Job, job.job_id)
        row.version = 1
        row.stage = "queued"
        row.scenes_completed = 0
        session.commit()
    new = old.another(incarnation="B")
    got = new.cache.get(job.job_id)
    assert got is not None and got.view.version == 1, "served an entry of the old database"
    assert new.cache.update_progress(job.job_id, STEPS[0])
    assert new.cached_version(job.job_id) == 2, "the pre-warm was refused"
    got = new.cache.get(job.job_id)
    assert got is not None and got.view.version == 2


# -- 11. bounded retries ------------------------------------------------------------------------


def test_a_corrupt_entry_that_keeps_coming_back_does_not_loop_forever(h: Harness) -> None:
    job = h.new_job()
    plants = 0

    def plant() -> None:
        nonlocal plants
        plants += 1
        if plants < 200:
            h.client.inner.set(h.keys.job(job.job_id), b"\xffgarbage")
            h.client.before = plant

    h.client.before = plant
    got = h.cache.get(job.job_id)
    h.client.before = None
    assert got is not None and got.view.version == 1
    assert plants < 20, f"the reader retried {plants} times"
