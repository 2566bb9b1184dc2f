"""Guarantee 5 with real sockets: Redis refusing, hanging, stopped and paused.

Each test owns its Redis: a closed port, a `HungServer` that accepts and never answers,
or a private `redis-server` it stops, restarts and pauses (never the shared one).
Assertions count what reached Redis, never how long something took.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.cache.backend import connect
from shared.cache.breaker import State
from tests.cache_helpers import (
    STEPS,
    HungServer,
    RecordingClient,
    free_port,
    make_harness,
    open_db,
    private_redis,
    state_of,
    wait_until,
)
from tests.conftest import require

pytestmark = [pytest.mark.redis, pytest.mark.faults, pytest.mark.timeout(90)]

TIMEOUT = 0.25


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Any]:
    engine, sessions = open_db(sqlite_url)
    yield sessions
    engine.dispose()


@pytest.fixture
def redis_server_binary() -> None:
    require("redis-server", shutil.which("redis-server") is not None)


def exercise(h: Any, job_id: int, rounds: int = 20) -> None:
    """Reads, a write, list reads and invalidations: everything must be answered."""
    for _ in range(rounds):
        got = h.cache.get(job_id)
        assert got is not None and got.view.job_id == job_id
    assert h.cache.get_list("alice@example.com", "p1", lambda: b"[]") == b"[]"
    assert h.cache.update_progress(job_id, STEPS[0]) is True
    got = h.cache.get(job_id)
    assert got is not None and got.view.version == 2
    h.cache.invalidate_job(job_id)
    h.cache.invalidate_lists("alice@example.com")
    stats = h.cache.stats()
    assert stats["statistics"]["redis_available"] is False


def test_a_refused_connection_costs_one_attempt_then_nothing(db: Any) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    h = make_harness(
        lambda: connect(url, socket_timeout=TIMEOUT), db, "closed", reset_seconds=60, recording=True
    )
    client = h.client
    assert isinstance(client, RecordingClient)
    job = h.new_job()
    exercise(h, job.job_id)
    assert client.round_trips == 1
    assert state_of(h.cache) is State.OPEN
    assert h.load.call_count == 21


def test_a_hung_redis_is_waited_on_once_per_reset_period(db: Any) -> None:
    with HungServer() as hung:
        h = make_harness(
            lambda: connect(hung.url, socket_timeout=TIMEOUT), db, "hung", reset_seconds=60
        )
        job = h.new_job()
        got = h.cache.get(job.job_id)  # waits one socket timeout, then the DB answers
        assert got is not None and got.view.version == 1
        assert state_of(h.cache) is State.OPEN
        assert hung.connections == 1
        seen = hung.bytes_received
        assert seen > 0
        exercise(h, job.job_id)
        assert (hung.connections, hung.bytes_received) == (1, seen), "Redis was asked again"
        h.clock.advance(61)  # one probe per reset period, still hung: open again
        for _ in range(5):
            assert h.cache.get(job.job_id) is not None
        assert wait_until(lambda: hung.connections == 2, 5)
        assert hung.connections == 2
        assert state_of(h.cache) is State.OPEN


def test_no_password_or_address_detail_leaks_into_statistics(
    db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-pw-do-not-log"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"
    h = make_harness(lambda: connect(url, socket_timeout=TIMEOUT), db, "secret")
    job = h.new_job()
    with caplog.at_level(logging.DEBUG):
        h.cache.get(job.job_id)
        stats = h.cache.stats()
    assert secret not in caplog.text
    assert secret not in repr(stats)
    assert "127.0.0.1" not in repr(stats)


def test_caching_resumes_by_itself_when_redis_comes_back(
    db: Any, tmp_path: Path, redis_server_binary: None
) -> None:
    with private_redis(tmp_path / "redis") as server:
        h = make_harness(
            lambda: connect(server.url, socket_timeout=TIMEOUT),
            db,
            "resume",
            reset_seconds=0.2,
            real_clock=True,
        )
        job = h.new_job()
        h.cache.get(job.job_id)
        assert h.cached_version(job.job_id) == 1
        server.stop()
        for _ in range(10):
            got = h.cache.get(job.job_id)
            assert got is not None and got.view.version == 1
        assert not h.cache.available()
        server.start()  # same port, empty, and it has forgotten our Lua scripts
        admin = server.admin()
        try:
            assert admin.script_exists("0" * 40) == [False]

            def served_from_cache() -> bool:
                loads = h.load.call_count
                got = h.cache.get(job.job_id)
                assert got is not None and got.view.version == 1
                return h.load.call_count == loads

            assert wait_until(served_from_cache, 15, 0.05), "caching did not resume"
            assert h.cache.available()
            assert h.cache.stats()["statistics"]["redis_available"] is True  # type: ignore[index]
            assert admin.exists(h.keys.job(job.job_id)) == 1
        finally:
            admin.close()


def test_a_write_while_redis_is_paused_is_repaired_before_caching_resumes(
    db: Any, tmp_path: Path, redis_server_binary: None
) -> None:
    with private_redis(tmp_path / "redis") as server:
        h = make_harness(
            lambda: connect(server.url, socket_timeout=TIMEOUT),
            db,
            "pause",
            reset_seconds=0.3,
            real_clock=True,
        )
        job = h.new_job()
        h.cache.get(job.job_id)
        h.cache.get_list("alice@example.com", "p1", lambda: b'["v1"]')
        admin = server.admin()
        try:
            assert h.cached_version(job.job_id) == 1
            admin.execute_command("CLIENT", "PAUSE", 2_000, "ALL")
            # The DB commits v2; the pre-warm times out against the paused server.
            assert h.cache.update_progress(job.job_id, STEPS[0]) is True
            assert h.db_version(job.job_id) == 2
            assert not h.cache.available()
            assert wait_until(lambda: admin.ping(), 15)  # answered once the pause is over
            assert h.cached_version(job.job_id) == 1, "precondition: the stale v1 survived"
        finally:
            admin.close()
        answers: list[tuple[int, bool]] = []  # (version, served from the cache)

        def read() -> bool:
            loads = h.load.call_count
            got = h.cache.get(job.job_id)
            assert got is not None
            answers.append((got.view.version, h.load.call_count == loads))
            return answers[-1][1]

        assert wait_until(read, 15, 0.05), "caching did not resume"
        assert {version for version, _ in answers} == {2}, answers
        assert h.cached_version(job.job_id) == 2
        assert h.cache.get_list("alice@example.com", "p1", lambda: b'["v2"]') == b'["v2"]'


def test_lua_is_loaded_again_after_a_restart_without_losing_counts(
    db: Any, tmp_path: Path, redis_server_binary: None
) -> None:
    with private_redis(tmp_path / "redis") as server:
        h = make_harness(
            lambda: connect(server.url, socket_timeout=TIMEOUT),
            db,
            "noscript",
            reset_seconds=0.2,
            real_clock=True,
        )
        job = h.new_job()
        h.cache.get(job.job_id)
        admin = server.admin()
        try:
            admin.script_flush()
            got = h.cache.get(job.job_id)
            assert got is not None and got.view.version == 1
            assert h.load.call_count == 1, "the reloaded script still served the hit"
            counts = h.counts()
            assert (counts["hits"], counts["misses"], counts["errors"]) == (1, 1, 0)
        finally:
            admin.close()
        # Time passes, but nothing else happens: the breaker never opened.
        time.sleep(0)
        assert state_of(h.cache) is State.CLOSED
