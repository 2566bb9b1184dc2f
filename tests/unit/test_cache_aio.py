"""The async hot read (`shared.cache.aio.AsyncJobReader`) keeps the cache's guarantees."""

from __future__ import annotations

import asyncio
from unittest import mock

import fakeredis
import pytest
import redis

from shared import jobs
from shared.cache.aio import AsyncJobReader
from shared.cache.breaker import State
from shared.cache.machine import Source, Why
from shared.db import build_engine, build_session_factory
from shared.runtime import build_cache


@pytest.fixture
def world(sqlite_url, make_settings):
    server = fakeredis.FakeServer()
    sync_client = fakeredis.FakeRedis(server=server)
    settings = make_settings(database_url=sqlite_url, cache_namespace="aio")
    engine = build_engine(settings.database_url)
    sessions = build_session_factory(engine)
    cache = build_cache(settings, sessions, redis_client=sync_client)
    with sessions() as session:
        view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=4)
    loader = mock.Mock(wraps=cache._load_job)
    cache._load_job = loader
    yield cache, server, sync_client, view, loader
    engine.dispose()


def run(coro):
    return asyncio.run(coro)


def test_concurrent_cold_reads_cost_one_db_read(world):
    cache, server, _, view, loader = world

    async def main():
        reader = AsyncJobReader(cache, fakeredis.FakeAsyncRedis(server=server))
        results = await asyncio.gather(*(reader.get(view.job_id) for _ in range(60)))
        await reader.close()
        return results

    results = run(main())
    assert {r.view.version for r in results} == {view.version}
    assert loader.call_count == 1
    stats = cache.stats()["statistics"]
    assert stats["hits"] + stats["misses"] == 60
    assert stats["misses"] == 1


def test_hit_of_another_clients_job_is_none(world):
    cache, server, _, view, loader = world

    async def main():
        reader = AsyncJobReader(cache, fakeredis.FakeAsyncRedis(server=server))
        owner = await reader.get(view.job_id, client_id="alice")
        foreign = await reader.get(view.job_id, client_id="mallory")
        await reader.close()
        return owner, foreign

    owner, foreign = run(main())
    assert owner is not None and owner.view.client_id == "alice"
    assert foreign is None
    assert loader.call_count == 1  # the foreign read was a hit, and still refused


def test_corrupt_entry_is_dropped_counted_and_served_from_db(world):
    cache, server, sync_client, view, _ = world
    sync_client.set(cache.keys.job(view.job_id), b'{"job_id": "nope"')

    async def main():
        reader = AsyncJobReader(cache, fakeredis.FakeAsyncRedis(server=server))
        job = await reader.get(view.job_id)
        await reader.close()
        return job

    job = run(main())
    assert job is not None and job.view.version == view.version
    stats = cache.stats()["statistics"]
    assert stats["errors"] == 1
    assert stats["hits"] == 0 and stats["misses"] == 1
    assert sync_client.get(cache.keys.job(view.job_id)) == job.body  # refilled with the truth


def test_after_a_failure_reads_skip_redis_until_the_probe(world):
    cache, server, _, view, loader = world
    clock = [0.0]
    cache.breaker._clock = lambda: clock[0]

    class Broken:
        calls = 0

        async def evalsha(self, *args):
            Broken.calls += 1
            raise OSError("connection refused")

        async def aclose(self):
            return None

    async def main():
        reader = AsyncJobReader(cache, Broken())  # type: ignore[arg-type]
        first = await reader.get(view.job_id)
        for _ in range(20):
            assert (await reader.get(view.job_id)) is not None
        return first

    first = run(main())
    assert first is not None
    assert Broken.calls == 1  # the breaker opened on the first failure
    assert cache.breaker.state is State.OPEN
    assert not cache.available()
    assert loader.call_count == 21

    # After the reset period the probe (sync backend, healthy) closes the breaker.
    clock[0] += 10

    async def healthy():
        reader = AsyncJobReader(cache, fakeredis.FakeAsyncRedis(server=server))
        served_while_probing = await reader.get(view.job_id)  # from the DB, probe beside it
        await asyncio.gather(*reader._background)
        state = cache.breaker.state.value
        job = await reader.get(view.job_id)
        await reader.close()
        return served_while_probing, state, job

    served_while_probing, state, job = run(healthy())
    assert served_while_probing is not None
    assert state == "closed"  # the background probe (sync backend, healthy) closed it
    assert job is not None


def test_a_slow_redis_is_hedged_by_the_db_and_the_breaker_waits_for_the_timeout(world):
    """Defect 12: after CACHE_HEDGE_MS without a Redis answer the poll is answered from
    the DB; the late failure (the full socket timeout) still opens the breaker."""
    cache, _, _, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    class Slow:
        async def evalsha(self, *args):
            await asyncio.sleep(1.0)
            raise TimeoutError("socket timeout")

        async def aclose(self):
            return None

    async def main():
        reader = AsyncJobReader(cache, Slow())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await reader.get(view.job_id)
        elapsed = loop.time() - started
        state_at_answer = cache.breaker.state
        await asyncio.gather(*reader._background)
        return got, elapsed, state_at_answer

    got, elapsed, state_at_answer = run(main())
    assert got is not None and got.view.version == view.version
    assert elapsed < 0.9, "the poll waited for Redis instead of hedging"
    assert state_at_answer is State.CLOSED, "the breaker is decided by the full timeout"
    assert cache.breaker.state is State.OPEN
    assert loader.call_count == 1
    stats = cache.stats()["statistics"]
    assert (stats["hits"], stats["misses"], stats["errors"]) == (0, 1, 1)


def test_a_failed_batch_degrades_each_read_to_the_database(world):
    cache, server, _, view, loader = world

    async def main():
        client = fakeredis.FakeAsyncRedis(server=server)
        reader = AsyncJobReader(cache, client)

        async def refused(*args, **kwargs):
            raise redis.exceptions.ResponseError("OOM command not allowed")

        client.evalsha = refused  # type: ignore[method-assign]
        results = await asyncio.gather(*(reader.read(view.job_id) for _ in range(5)))
        await reader.close()
        return results, reader.batch_sizes

    results, sizes = run(main())
    assert sizes[5] == 1  # the five reads went out as one call
    assert [(r.source, r.why) for r in results] == [(Source.DATABASE, Why.FAILED)] * 5
    assert all(r.job is not None and r.job.version == view.version for r in results)
    assert loader.call_count == 5
    cache.flush()
    stats = cache.stats()["statistics"]
    assert (stats["misses"], stats["errors"]) == (5, 5)


def test_on_a_cluster_a_batch_is_split_by_hash_slot(world):
    cache, server, _, view, _ = world
    from redis.crc import key_slot

    async def main():
        reader = AsyncJobReader(cache, fakeredis.FakeAsyncRedis(server=server), split_by_slot=True)
        ids = [view.job_id, view.job_id, view.job_id + 1, view.job_id + 2]
        await asyncio.gather(*(reader.read(j) for j in ids))
        await reader.close()
        return ids, reader.batch_sizes

    ids, sizes = run(main())
    slots = {key_slot(cache.keys.job(j).encode()) for j in ids}
    assert len(slots) == 3
    assert sum(sizes.values()) >= 3  # one batch per slot at least
    assert sizes[2] >= 1  # the two reads of one job shared a batch
