"""Guarantee 8 across OS processes: the statistics are global and exact.

Spawned processes (fresh interpreters, as API and worker processes are) read through
their own caches on the real Redis; every cache then shows the combined counts, and
hits + misses equal the reads served. Counts made while Redis was unreachable are
flushed once it is back.
"""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.cache.backend import connect
from tests.cache_helpers import (
    make_harness,
    new_job,
    open_db,
    private_redis,
    stats_child,
    wait_until,
)
from tests.conftest import require


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Any]:
    engine, sessions = open_db(sqlite_url)
    yield sessions
    engine.dispose()


@pytest.mark.redis
@pytest.mark.timeout(180)
def test_counts_from_spawned_processes_and_two_caches_add_up_exactly(
    redis_url: str, sqlite_url: str, namespace: str, db: Any
) -> None:
    clients: list[Any] = []

    def factory() -> Any:
        clients.append(connect(redis_url, socket_timeout=5.0))
        return clients[-1]

    a = make_harness(factory, db, namespace, lease_ms=5_000)
    b = a.another()
    job_ids = [new_job(db).job_id for _ in range(3)]
    try:
        served = 0
        for harness, reads in ((a, 10), (b, 7)):
            for i in range(reads):
                assert harness.cache.get(job_ids[i % 3]) is not None
                served += 1
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = [
                pool.submit(stats_child, redis_url, sqlite_url, namespace, job_ids, 15)
                for _ in range(2)
            ]
            served += sum(f.result(timeout=150) for f in futures)
        assert served == 47
        for harness in (a, b):  # each process flushes its counts in batches: do it now
            assert harness.cache.flush()
        for harness in (a, b):
            counts = harness.counts()
            assert counts["hits"] + counts["misses"] == served == counts["total_requests"]
            assert counts["misses"] == 3, "one fill per job, whichever process made it"
            assert counts["errors"] == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.redis
@pytest.mark.faults
@pytest.mark.timeout(90)
def test_counts_made_while_redis_was_unreachable_are_flushed_when_it_is_back(
    db: Any, tmp_path: Path
) -> None:
    require("redis-server", shutil.which("redis-server") is not None)
    with private_redis(tmp_path / "redis") as server:

        def factory() -> Any:
            return connect(server.url, socket_timeout=0.25)

        # The breaker's clock is moved by hand: no probe can happen during the pause.
        a = make_harness(factory, db, "flush", reset_seconds=5)
        b = a.another()
        job = a.new_job()
        a.cache.get(job.job_id)
        a.cache.get(job.job_id)
        assert a.cache.flush()  # counts are flushed in batches: these two land now
        reads = 2
        admin = server.admin()
        try:
            admin.execute_command("CLIENT", "PAUSE", 1_000, "ALL")
            for _ in range(4):  # the first waits one socket timeout; the rest skip Redis
                assert a.cache.get(job.job_id) is not None
                reads += 1
            assert not a.cache.available()
            assert wait_until(lambda: bool(admin.ping()), 15)  # the pause is over
        finally:
            admin.close()
        before = b.counts()
        assert before["hits"] + before["misses"] == 2, "a's outage counts are still pending"
        a.clock.advance(6)
        assert a.cache.get(job.job_id) is not None  # the probe flushes a's pending counts
        reads += 1
        assert a.cache.available()
        assert a.cache.flush()  # and this read's own count
        counts = b.counts()
        assert counts["hits"] + counts["misses"] == reads == counts["total_requests"]
        assert counts["errors"] == 1
        assert a.counts() == counts
