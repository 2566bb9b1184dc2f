"""Cold keys under a slow database, on the real Redis and PostgreSQL, through the
production wiring (`Runtime.start`: the fill lease is tied to the DB statement timeout)
and the asyncio reader the API serves polls with (README "The cache and its guarantees").

Every SELECT of the runtime's engine is delayed 600 ms in PostgreSQL (`pg_sleep`, as
`bench.slowapi` does for section 7 of the benchmark). 200 concurrent cold reads of one job
must cost at most 2 DB reads, and the next 200 reads must all be hits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from bench.slowapi import slow_reads
from shared.cache.aio import AsyncJobReader, connect_async
from shared.cache.machine import ReadResult, Source
from shared.runtime import Runtime
from shared.settings import Settings
from tests.cache_helpers import new_job

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(180)]

DELAY_MS = 600
READERS = 200


@pytest.fixture
def runtime(pg_url: str, redis_url: str, namespace: str) -> Iterator[Runtime]:
    settings = Settings(
        _env_file=None,
        database_url=pg_url,
        redis_url=redis_url,
        cache_namespace=namespace,
        db_statement_timeout_ms=2_000,
        db_pool_size=2,
        db_max_overflow=2,
        # The shared Redis on a loaded machine: a 0.25 s timeout would open the breaker
        # (and send every reader to the DB) for reasons this test is not about.
        redis_socket_timeout=5.0,
    )
    runtime = Runtime.start(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def test_200_cold_async_reads_on_a_600_ms_db_cost_at_most_two_db_reads(
    runtime: Runtime, redis_url: str
) -> None:
    job = new_job(runtime.sessions)
    assert runtime.cache.policy.lease_ms > DELAY_MS, "the lease must outlast the slow read"
    slow_reads(DELAY_MS, runtime.engine)
    selects: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(runtime.engine, "before_cursor_execute", count)

    async def waves() -> tuple[list[ReadResult], list[ReadResult], int]:
        client = connect_async(redis_url, socket_timeout=5.0)
        reader = AsyncJobReader(runtime.cache, client)
        try:
            first = await asyncio.gather(*(reader.read(job.job_id) for _ in range(READERS)))
            cold_reads = len(selects)
            second = await asyncio.gather(*(reader.read(job.job_id) for _ in range(READERS)))
        finally:
            await reader.close()
        return first, second, cold_reads

    first, second, cold_reads = asyncio.run(waves())
    assert runtime.cache.breaker.outages == 0, "Redis failed: this run measured nothing"
    assert all(r.job is not None and r.job.view.job_id == job.job_id for r in first)
    assert 1 <= cold_reads <= 2, f"{cold_reads} DB reads for {READERS} cold reads of one job"
    from_db = sum(1 for r in first if r.source is Source.DATABASE)
    assert from_db == cold_reads, (from_db, cold_reads)
    assert len(selects) == cold_reads, "the next wave read the DB"
    assert all(r.source is Source.CACHE and r.job is not None for r in second), [
        (r.source, r.why) for r in second if r.source is not Source.CACHE
    ]
