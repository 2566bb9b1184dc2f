"""Batched cache reads (`AsyncJobReader`, CACHE_READ_BATCHING) on the real Redis answer
exactly as single reads do: the same jobs, the same ownership answers, the same
statistics, through cold reads, warm reads, tombstones and planted bad values."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from shared import jobs
from shared.cache.aio import AsyncJobReader, connect_async
from shared.db import build_engine, build_session_factory
from shared.runtime import build_cache

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

MISSING = 999_999


@pytest.fixture
def world(sqlite_url: str, redis_url: str, namespace: str, make_settings: Any) -> Iterator[Any]:
    settings = make_settings(
        database_url=sqlite_url, redis_url=redis_url, cache_namespace=namespace
    )
    engine = build_engine(settings.database_url)
    sessions = build_session_factory(engine)
    with sessions() as session:
        alice = jobs.create_job(session=session, client_id="alice", prompt="a", scenes_total=4)
        bob = jobs.create_job(session=session, client_id="bob", prompt="b", scenes_total=2)
    admin = redis.Redis.from_url(redis_url)
    yield settings, sessions, admin, alice.job_id, bob.job_id
    admin.close()
    engine.dispose()


def scenario(world: Any, *, batching: bool) -> tuple[list[Any], dict[str, Any], list[int]]:
    """Concurrent reads in rounds, with bad values planted between rounds."""
    settings, sessions, admin, a, b = world
    ns = settings.key_namespace
    for key in admin.scan_iter(match=f"{ns}*", count=1000):
        admin.delete(key)
    cache = build_cache(settings, sessions)
    reads = [(a, "alice"), (a, "bob"), (b, "bob"), (MISSING, "alice"), (b, "alice")] * 6

    async def rounds() -> tuple[list[Any], list[int]]:
        reader = AsyncJobReader(
            cache, connect_async(settings.redis_url, socket_timeout=5.0), batching=batching
        )
        answers: list[Any] = []

        async def read_all(plan: list[tuple[int, str]]) -> None:
            got = await asyncio.gather(*(reader.get(j, client_id=c) for j, c in plan))
            answers.append([None if g is None else (g.job_id, g.version, g.body) for g in got])

        try:
            await read_all(reads)  # cold: one lease per job, the others wait for its fill
            await read_all(reads)  # warm
            admin.delete(cache.keys.job(a))
            admin.hset(cache.keys.job(a), "x", "1")  # a value of the wrong type
            admin.set(cache.keys.job(b), b"garbage")  # no seal
            # Each bad value met once (batched: in one READ_JOBS call, where the wrong
            # type fails only its own read), dropped, counted.
            await read_all([(a, "alice"), (b, "bob")])
            await read_all(reads)
        finally:
            await reader.close()
        return answers, sorted(reader.batch_sizes.elements())

    answers, sizes = asyncio.run(rounds())
    cache.flush()
    counts = cache.stats()["statistics"]
    assert isinstance(counts, dict)
    cache.close()
    return answers, {k: counts[k] for k in ("hits", "misses", "errors")}, sizes


def test_batched_reads_answer_and_count_exactly_as_single_reads(world: Any) -> None:
    single, single_counts, single_sizes = scenario(world, batching=False)
    batched, batched_counts, batched_sizes = scenario(world, batching=True)
    assert batched == single
    assert batched_counts == single_counts
    assert single_counts["errors"] == 2  # the planted values, once each
    assert single_sizes == []
    assert max(batched_sizes) > 1  # reads were batched
    # Ownership held in both: bob never got alice's job, nobody got the missing one.
    _, a, b = world[2:]
    for round_ in single:
        assert all(g is None or g[0] in (a, b) for g in round_)
    assert single[1][1] is None and single[1][3] is None and single[1][4] is None
