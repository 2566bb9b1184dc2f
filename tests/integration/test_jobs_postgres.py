"""The data layer on PostgreSQL (READ COMMITTED: the version check in the UPDATE is what
serializes racing writers), and the cache's write path on PostgreSQL with the real Redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared.cache.backend import connect
from shared.schemas import ProgressRegression
from tests.cache_helpers import STEPS, make_harness, new_job, open_db, run_threads
from tests.unit.test_jobs import JobsContract, unique_client


@pytest.mark.postgres
class TestJobsOnPostgres(JobsContract):
    """The data-layer contract on a fresh, migrated PostgreSQL database."""

    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        return pg_url


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[Any]:
    engine, sessions = open_db(pg_url)
    yield sessions
    engine.dispose()


@pytest.fixture
def redis_factory(redis_url: str) -> Iterator[Callable[[], Any]]:
    clients: list[Any] = []

    def factory() -> Any:
        client = connect(redis_url, socket_timeout=5.0)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
def test_concurrent_writers_through_the_cache_on_postgres(
    pg_sessions: Any, redis_factory: Callable[[], Any], namespace: str
) -> None:
    scenes = 40
    base = make_harness(redis_factory, pg_sessions, namespace)
    writers = [base, *(base.another() for _ in range(3))]
    client = unique_client()
    job = new_job(pg_sessions, client, scenes_total=scenes)

    def walk(i: int) -> list[int]:
        w, seen = writers[i], []
        for n in range(scenes + 1):
            with contextlib.suppress(ProgressRegression):  # another writer got further
                w.cache.update_progress(
                    job.job_id, {"current_stage": "rendering", "scenes_completed": n}
                )
            got = w.cache.get(job.job_id, client_id=client)
            assert got is not None
            seen.append(got.view.version)
        return seen

    for seen in run_threads(len(writers), walk):
        assert seen == sorted(seen)
    assert base.db_version(job.job_id) == 1 + (scenes + 1)
    assert base.cached_version(job.job_id) == base.db_version(job.job_id)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(60)
def test_fresh_after_write_on_postgres(
    pg_sessions: Any, redis_factory: Callable[[], Any], namespace: str
) -> None:
    writer = make_harness(redis_factory, pg_sessions, namespace)
    reader = writer.another()
    job = writer.new_job(unique_client())
    assert reader.cache.get(job.job_id) is not None
    for expected, step in enumerate(STEPS, start=2):
        assert writer.cache.update_progress(job.job_id, step)
        got = reader.cache.get(job.job_id)
        assert got is not None and got.view.version >= expected
    assert reader.load.call_count == 1
