"""Guarantee 5 on fakeredis, plus the modes without Redis.

Redis down costs nothing twice: a failed call opens the breaker, and until the reset
period has passed no read touches Redis (counted on a recording client). The breaker's
probe repairs the entries of jobs written during the outage. Counts made while Redis
was away are flushed when it is back. With caching off (no backend) or without the
`redis` package, everything is served from the database.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from shared.cache import configure, get_cache_stats, redis_available
from shared.cache.breaker import State
from shared.runtime import Runtime, build_cache
from shared.settings import REPO_ROOT
from tests.cache_helpers import (
    STEPS,
    Harness,
    Make,
    RecordingClient,
    make_harness,
    open_db,
    state_of,
)

RESET = 5.0


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
        options.setdefault("reset_seconds", RESET)
        options.setdefault("recording", True)
        return make_harness(lambda: fakeredis.FakeRedis(server=server), db, "deg", **options)

    return build


@pytest.fixture
def h(make: Make) -> Harness:
    return make()


def recorder(h: Harness) -> RecordingClient:
    assert isinstance(h.client, RecordingClient)
    return h.client


def test_reads_are_served_from_the_db_and_redis_is_not_asked_again(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    server.connected = False
    client = recorder(h)
    client.reset()
    got = h.cache.get(job.job_id)
    assert got is not None and got.view.version == 1
    assert client.round_trips == 1, "the first read tried Redis once"
    assert state_of(h.cache) is State.OPEN
    assert not h.cache.available()
    for _ in range(20):
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 1
    h.cache.get_list("alice@example.com", "p1", lambda: b"[]")
    assert h.cache.update_progress(job.job_id, STEPS[0])
    h.cache.invalidate_job(job.job_id)
    h.clock.advance(RESET * 0.9)
    assert h.cache.get(job.job_id) is not None
    assert client.round_trips == 1, "no call waited on Redis while the breaker was open"
    assert h.load.call_count == 22


def test_caching_resumes_after_the_reset_period_without_a_restart(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    server.connected = False
    h.cache.get(job.job_id)
    server.connected = True
    h.clock.advance(RESET * 0.5)
    h.cache.get(job.job_id)
    assert state_of(h.cache) is State.OPEN, "too early to probe"
    h.clock.advance(RESET)
    client = recorder(h)
    client.reset()
    assert h.cache.get(job.job_id) is not None  # the probe, then a fill
    assert "PING" in client.names()
    assert h.cache.available() and state_of(h.cache) is State.CLOSED
    loads = h.load.call_count
    got = h.cache.get(job.job_id)
    assert got is not None and got.view.version == 1
    assert h.load.call_count == loads, "served from the cache again"


def test_a_probe_while_redis_is_still_down_costs_one_call_and_reopens(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    server.connected = False
    h.cache.get(job.job_id)
    h.clock.advance(RESET + 0.1)
    client = recorder(h)
    client.reset()
    for _ in range(10):
        assert h.cache.get(job.job_id) is not None
    assert client.round_trips == 1
    assert state_of(h.cache) is State.OPEN


def test_the_outage_is_logged_once_at_warning(
    h: Harness, server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    job = h.new_job()
    server.connected = False
    with caplog.at_level(logging.DEBUG, logger="shared.cache"):
        for _ in range(3):
            for _ in range(5):
                h.cache.get(job.job_id)
            h.clock.advance(RESET + 0.1)  # each probe fails again: the same outage
        server.connected = True
        h.cache.get(job.job_id)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "shared.cache.breaker"
    assert any("back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_write_during_an_outage_is_repaired_when_redis_returns(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)
    h.cache.get_list("alice@example.com", "p1", lambda: b'["v1"]')
    assert h.cached_version(job.job_id) == 1
    server.connected = False
    assert h.cache.update_progress(job.job_id, STEPS[0])  # DB v2, pre-warm lost
    server.connected = True
    assert h.cached_version(job.job_id) == 1, "the stale v1 is still in Redis"
    h.clock.advance(RESET + 0.1)
    answers = []  # (version, served from the cache)
    for _ in range(4):
        loads = h.load.call_count
        got = h.cache.get(job.job_id)
        assert got is not None
        answers.append((got.view.version, h.load.call_count == loads))
    assert [version for version, _ in answers] == [2, 2, 2, 2]
    assert any(cached for _, cached in answers), "caching resumed"
    assert h.cached_version(job.job_id) == 2
    assert h.cache.get_list("alice@example.com", "p1", lambda: b'["v2"]') == b'["v2"]'


def test_counts_made_while_redis_was_down_are_flushed_when_it_is_back(
    make: Make, server: fakeredis.FakeServer
) -> None:
    a = make()
    b = a.another()
    job = a.new_job()
    server.connected = False
    for _ in range(4):
        a.cache.get(job.job_id)
    down = a.counts()
    assert (down["misses"], down["errors"], down["redis_available"]) == (4, 1, False)
    server.connected = True
    assert b.counts()["misses"] == 0, "not flushed yet: a has not talked to Redis"
    a.clock.advance(RESET + 0.1)
    a.cache.get(job.job_id)  # the probe flushes a's pending counts
    a.cache.flush()  # and this read's own count
    counts = b.counts()
    assert counts["hits"] + counts["misses"] == 5 == counts["total_requests"]
    assert counts["errors"] == 1
    assert a.counts() == counts


def test_statistics_while_down_say_so_and_never_fail(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    configure(h.cache)
    try:
        job = h.new_job()
        h.cache.get(job.job_id)
        h.cache.get(job.job_id)
        get_cache_stats()  # the last counts seen from Redis are what a stats call can show
        server.connected = False
        h.cache.get(job.job_id)
        stats = get_cache_stats()
        assert redis_available() is False
    finally:
        configure(None)
    assert stats["cache_enabled"] is True
    statistics = stats["statistics"]
    assert isinstance(statistics, dict)
    assert statistics["redis_available"] is False and statistics["redis_enabled"] is True
    assert (statistics["hits"], statistics["misses"], statistics["errors"]) == (1, 2, 1)
    assert "unavailable" in str(stats["message"]).lower()
    assert "database" in str(stats["message"]).lower()


def test_a_corrupt_entry_met_by_the_recovery_probe_closes_the_breaker(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    """Redis answered the probe; a foreign value at one key must not leave the breaker
    half-open forever (every later call would skip Redis)."""
    h.client.hset(h.keys.job(777), "foreign", "hash")
    server.connected = False
    h.cache.get(777)
    server.connected = True
    h.clock.advance(RESET + 0.1)
    assert h.cache.get(777) is None
    assert state_of(h.cache) is State.CLOSED
    job = h.new_job()
    h.cache.get(job.job_id)
    assert h.cached_version(job.job_id) == 1, "caching resumed"
    assert h.raw(777) == b"", "the foreign value was dropped (a tombstone: no such job)"


def test_pending_counts_are_not_counted_twice_when_a_call_meets_a_corrupt_entry(
    h: Harness, server: fakeredis.FakeServer
) -> None:
    h.client.hset(h.keys.job(778), "foreign", "hash")
    server.connected = False
    h.cache.get(778)  # one read, served by the DB: pending miss + error
    server.connected = True
    h.clock.advance(RESET + 0.1)
    h.cache.get(778)  # the pending counts ride with the call that meets the bad key
    counts = h.counts()
    assert counts["hits"] + counts["misses"] == 2
    assert counts["errors"] == 2  # the failed call and the bad entry


def test_scripts_are_reloaded_after_a_script_flush(h: Harness) -> None:
    job = h.new_job()
    h.cache.get(job.job_id)
    h.client.script_flush()
    assert h.cache.update_progress(job.job_id, STEPS[0])
    got = h.cache.get(job.job_id)
    assert got is not None and got.view.version == 2
    assert h.load.call_count == 1
    counts = h.counts()
    assert counts["errors"] == 0
    assert (counts["hits"], counts["misses"]) == (1, 1)


# -- caching off ---------------------------------------------------------------------------------


def test_with_caching_off_every_read_goes_to_the_db(make: Make) -> None:
    h = make(backend=False)
    assert h.cache.backend is None and not h.cache.enabled and not h.cache.available()
    job = h.new_job()
    for _ in range(3):
        got = h.cache.get(job.job_id)
        assert got is not None and got.view.version == 1
    assert h.cache.get(job.job_id, client_id="mallory@example.com") is None
    assert h.cache.update_progress(job.job_id, STEPS[0]) is True
    got = h.cache.get(job.job_id)
    assert got is not None and got.view.version == 2
    assert h.cache.get_list("alice@example.com", "p1", lambda: b"[1]") == b"[1]"
    assert h.cache.invalidate_job(job.job_id) is False
    assert h.cache.invalidate_lists("alice@example.com") is False
    assert h.load.call_count == 5
    stats = h.cache.stats()
    statistics = stats["statistics"]
    assert isinstance(statistics, dict)
    assert stats["cache_enabled"] is False
    assert statistics["redis_enabled"] is False and statistics["redis_available"] is False
    assert (statistics["hits"], statistics["misses"]) == (0, 6)
    assert "disabled" in str(stats["message"]).lower()
    h.cache.close()


def test_an_empty_redis_url_turns_caching_off(make_settings: Any, sqlite_url: str) -> None:
    runtime = Runtime.start(make_settings(database_url=sqlite_url, redis_url=""))
    try:
        assert runtime.cache.backend is None
        assert redis_available() is False
        assert get_cache_stats()["cache_enabled"] is False
    finally:
        runtime.close()


def test_build_cache_uses_the_client_it_is_given(make_settings: Any, sqlite_url: str) -> None:
    engine, sessions = open_db(sqlite_url)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    try:
        settings = make_settings(database_url=sqlite_url, cache_namespace="given")
        cache = build_cache(settings, sessions, redis_client=client)
        assert cache.enabled
        cache.get_list("alice@example.com", "p1", lambda: b"[]")
        assert client.exists("given:jobs:{alice@example.com}") == 1
    finally:
        engine.dispose()


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules[{blocked!r}] = None  # importing it now raises ImportError
    from shared.runtime import Runtime
    from shared.settings import Settings
    from shared import jobs
    import shared.cache as cache_api

    settings = Settings(_env_file=None, database_url={db!r}, redis_url="redis://127.0.0.1:9/0")
    runtime = Runtime.start(settings)
    with runtime.sessions() as session:
        job = jobs.create_job(session=session, client_id="a@b.c", prompt="p", scenes_total=2)
    first = cache_api.get_job_with_cache(job.job_id)
    updated = cache_api.update_job_progress_with_cache(job.job_id, {{"current_stage": "scripting"}})
    second = cache_api.get_job_with_cache(job.job_id)
    print(json.dumps({{
        "enabled": runtime.cache.enabled,
        "available": cache_api.redis_available(),
        "versions": [first["version"], second["version"]],
        "updated": updated,
        "stats": cache_api.get_cache_stats(),
        "redis_loaded": "redis" in sys.modules and sys.modules["redis"] is not None,
    }}))
    runtime.close()
    """
)


@pytest.mark.parametrize("blocked", ["redis", "shared.cache.backend"])
def test_without_the_redis_package_the_system_runs_on_the_db(sqlite_url: str, blocked: str) -> None:
    code = CHILD.format(blocked=blocked, db=sqlite_url)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["enabled"] is False and result["available"] is False
    assert result["versions"] == [1, 2] and result["updated"] is True
    assert result["stats"]["cache_enabled"] is False
    assert result["stats"]["statistics"]["misses"] == 2
    assert "caching is off" in proc.stderr
    if blocked == "redis":
        assert result["redis_loaded"] is False
