"""The async hot read (`shared.cache.aio.AsyncJobReader`) keeps the cache's guarantees."""

from __future__ import annotations

import asyncio
import threading
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
from shared.schemas import ProgressUpdate


@pytest.fixture
def sessions(sqlite_url):
    engine = build_engine(sqlite_url)
    yield build_session_factory(engine)
    engine.dispose()


@pytest.fixture
def world(sqlite_url, make_settings, sessions):
    server = fakeredis.FakeServer()
    sync_client = fakeredis.FakeRedis(server=server)
    # fakeredis runs a batch's Lua far slower than Redis: no hedging unless a test sets it.
    settings = make_settings(database_url=sqlite_url, cache_namespace="aio", cache_hedge_ms=0)
    cache = build_cache(settings, sessions, redis_client=sync_client)
    with sessions() as session:
        view = jobs.create_job(session=session, client_id="alice", prompt="p", scenes_total=4)
    loader = mock.Mock(wraps=cache._load_job)
    cache._load_job = loader
    return cache, server, sync_client, view, loader


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


class Delayed:
    """A fakeredis client whose script calls answer after the given delays, in turn
    (then at once); a delay given as ("timeout", s) raises a socket timeout after s."""

    def __init__(self, inner, delays):
        self.inner, self.delays = inner, list(delays)
        self.calls = 0

    async def evalsha(self, *args):
        self.calls += 1
        delay = self.delays.pop(0) if self.delays else 0.0
        if isinstance(delay, tuple):
            await asyncio.sleep(delay[1])
            raise TimeoutError("socket timeout")
        await asyncio.sleep(delay)
        return await self.inner.evalsha(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def warmed(cache, client, job_id):
    """A reader that has served `job_id` from the cache (hedging applies to such jobs)."""
    reader = AsyncJobReader(cache, client)
    for _ in range(2):  # a fill (the first time), then a hit
        await reader.read(job_id)
    assert (await reader.read(job_id)).source is Source.CACHE
    return reader


def test_a_slow_redis_is_hedged_by_the_db_and_the_breaker_waits_for_the_timeout(world):
    """Defect 12: after CACHE_HEDGE_MS without a Redis answer the poll is answered from
    the DB; the late failure (the full socket timeout) still opens the breaker."""
    cache, server, _, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [])
        reader = await warmed(cache, client, view.job_id)
        loader.reset_mock()
        client.delays.append(("timeout", 1.0))
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await reader.read(view.job_id)
        elapsed = loop.time() - started
        state_at_answer = cache.breaker.state
        await asyncio.gather(*reader._background)
        return got, elapsed, state_at_answer

    got, elapsed, state_at_answer = run(main())
    assert (got.source, got.why) == (Source.DATABASE, Why.HEDGED)
    assert got.job is not None and got.job.version == view.version
    assert elapsed < 0.9, "the poll waited for Redis instead of hedging"
    assert state_at_answer is State.CLOSED, "the breaker is decided by the full timeout"
    assert cache.breaker.state is State.OPEN
    assert loader.call_count == 1


def test_a_silent_call_hedges_every_read_in_it_and_the_late_lease_still_fills(world):
    """Hedging is per call: ten reads of one warm job (its entry just evicted) in one
    silent call are all answered from one DB read; the late answer (a lease) settles
    the breaker and fills."""
    cache, server, sync_client, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [])
        reader = await warmed(cache, client, view.job_id)
        loader.reset_mock()
        sync_client.delete(cache.keys.job(view.job_id))  # evicted
        client.delays.append(0.3)
        results = await asyncio.gather(*(reader.read(view.job_id) for _ in range(10)))
        await asyncio.gather(*reader._background)
        await reader.close()
        return results, reader.batch_sizes

    results, sizes = run(main())
    assert sizes[10] == 1
    assert {(r.source, r.why) for r in results} == {(Source.DATABASE, Why.HEDGED)}
    assert {r.job.version for r in results if r.job} == {view.version}
    assert loader.call_count == 1  # one DB read for the call's ten reads of one job
    assert cache.breaker.state is State.CLOSED  # Redis answered, late: not an outage
    assert sync_client.get(cache.keys.job(view.job_id)) is not None  # the lease filled


def test_cold_reads_are_never_hedged(world):
    """A job this reader has not served from the cache is not hedged, however long Redis
    takes: its one DB read is the lease holder's (a machine too busy to read Redis's
    answer in time must not send a stampede to the DB)."""
    cache, server, _, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [0.2])
        reader = AsyncJobReader(cache, client)  # type: ignore[arg-type]
        results = await asyncio.gather(*(reader.read(view.job_id) for _ in range(30)))
        await asyncio.gather(*reader._background)
        await reader.close()
        return results

    results = run(main())
    assert Why.HEDGED not in {r.why for r in results}
    assert loader.call_count == 1


def test_a_burst_is_not_hedged(world):
    """Thirty reads of a warm job waiting on one slow call are a burst (its answer may
    only be waiting for our own busy event loop): not hedged, one DB read at most."""
    cache, server, sync_client, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [])
        reader = await warmed(cache, client, view.job_id)
        loader.reset_mock()
        sync_client.delete(cache.keys.job(view.job_id))  # evicted: a stampede
        client.delays.append(0.2)
        results = await asyncio.gather(*(reader.read(view.job_id) for _ in range(30)))
        await reader.close()
        return results

    results = run(main())
    assert Why.HEDGED not in {r.why for r in results}
    assert loader.call_count == 1


def test_while_redis_is_silent_new_reads_do_not_wait_for_the_hedge(world):
    """After a call is hedged, reads of warm jobs go to the DB at once until Redis
    answers again; the late answer ends the silence, and reads use Redis again."""
    cache, server, _, view, _ = world
    object.__setattr__(cache.policy, "hedge_ms", 50)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [])
        reader = await warmed(cache, client, view.job_id)
        client.delays.append(0.4)
        loop = asyncio.get_running_loop()
        first = await reader.read(view.job_id)  # hedged after 50 ms
        started = loop.time()
        calls = client.calls
        during = await reader.read(view.job_id)
        waited = loop.time() - started
        skipped = client.calls == calls
        await asyncio.sleep(0.5)  # the silent call answers (late): Redis is back
        after = await reader.read(view.job_id)
        await reader.close()
        return first, during, waited, skipped, after

    first, during, waited, skipped, after = run(main())
    assert first.why is Why.HEDGED and during.why is Why.HEDGED
    assert skipped, "a read during the silence called Redis"
    assert waited < 0.04, "a read during the silence waited for the hedge delay"
    assert (after.source, after.why) == (Source.CACHE, Why.HIT)
    assert cache.breaker.state is State.CLOSED


def test_a_busy_redis_is_not_hedged(world):
    """A call without an answer while other calls of the reader are answered is waiting
    on a busy Redis: it is not hedged (that would only move load to the database)."""
    cache, server, _, view, loader = world
    object.__setattr__(cache.policy, "hedge_ms", 20)

    async def main():
        client = Delayed(fakeredis.FakeAsyncRedis(server=server), [])
        reader = await warmed(cache, client, view.job_id)
        loader.reset_mock()
        client.delays.append(0.2)
        slow = asyncio.ensure_future(reader.read(view.job_id))
        for _ in range(25):  # other calls, answered at once, meanwhile
            await asyncio.sleep(0.01)
            assert (await reader.read(view.job_id)).why is Why.HIT
        result = await slow
        await reader.close()
        return result

    result = run(main())
    assert (result.source, result.why) == (Source.CACHE, Why.HIT)
    assert loader.call_count == 0


def test_a_failed_batch_degrades_each_read_to_the_database(world, sessions):
    cache, server, _, view, loader = world
    with sessions() as session:
        other = jobs.create_job(session=session, client_id="bob", prompt="p", scenes_total=4)

    async def main():
        client = fakeredis.FakeAsyncRedis(server=server)
        reader = AsyncJobReader(cache, client)

        async def refused(*args, **kwargs):
            raise redis.exceptions.ResponseError("OOM command not allowed")

        client.evalsha = refused  # type: ignore[method-assign]
        ids = [view.job_id] * 5 + [other.job_id] * 3
        results = await asyncio.gather(*(reader.read(job_id) for job_id in ids))
        await reader.close()
        return results, reader.batch_sizes

    results, sizes = run(main())
    assert sizes[8] == 1  # the eight reads went out as one call
    assert [(r.source, r.why) for r in results] == [(Source.DATABASE, Why.FAILED)] * 8
    assert [r.job.job_id for r in results if r.job] == [view.job_id] * 5 + [other.job_id] * 3
    # Each read is answered from the DB; overlapping reads of one job share its DB read.
    assert sorted(call.args[0] for call in loader.call_args_list) == [view.job_id, other.job_id]
    cache.flush()
    stats = cache.stats()["statistics"]
    assert (stats["misses"], stats["errors"]) == (8, 8)


def test_a_read_never_shares_a_db_read_begun_before_it(world, sessions):
    """Fallback DB reads of one job are shared, but a read that starts after a write may
    not join a DB read begun before that write (it would answer the older version)."""
    cache, server, _, view, loader = world
    release = threading.Event()

    def slow_first(job_id):
        with sessions() as session:
            row = jobs.get_job(job_id, session=session)
        release.wait(5)  # every DB read hangs, its row read, until the test lets them go
        return row

    loader.side_effect = slow_first

    async def main():
        client = fakeredis.FakeAsyncRedis(server=server)

        async def refused(*args, **kwargs):
            raise redis.exceptions.ResponseError("OOM command not allowed")

        client.evalsha = refused  # type: ignore[method-assign]
        reader = AsyncJobReader(cache, client)
        first = asyncio.ensure_future(reader.read(view.job_id))
        await asyncio.sleep(0.05)  # its DB read has begun, and hangs
        with sessions() as session:  # v2, committed after that DB read began
            update = ProgressUpdate.parse({"current_stage": "storyboard"})
            assert jobs.update_job_progress(view.job_id, update, session=session)
        # Two reads that start together fail together: the first to need the DB begins a
        # DB read, the other joins it (it began after both reads did).
        second = asyncio.ensure_future(reader.read(view.job_id))
        third = asyncio.ensure_future(reader.read(view.job_id))
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, second, third)
        await reader.close()
        return results

    first, second, third = run(main())
    assert first.job is not None and first.job.version == view.version  # read before v2
    assert first.job is not None and second.job is not None and third.job is not None
    assert second.job.version == third.job.version == view.version + 1
    assert loader.call_count == 2
    assert first.why is second.why is third.why is Why.FAILED


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
