"""The cached poll on asyncio: one EVALSHA per hit, no thread hop.

Measured on this machine (FastAPI, 1 worker, wrk -c32): a redis.asyncio GET in an
`async def` handler serves ~1.9x the requests of a sync redis-py GET in a `def`
handler (the threadpool hop and GIL hand-offs cost more than the request itself).
So the hot read runs here, on the event loop: the same sans-IO machine as the
synchronous `JobCache` (`machine.read_job`), driven by awaits. Everything rare (the DB
read, the fill, a drop, the breaker's repair probe) runs on the synchronous cache in a
worker thread; the probe runs beside the request, never inside it.

Hedged read (`CachePolicy.hedge_ms`), per batch: when a Redis call has given no answer
within the delay and no other call of this reader was answered meanwhile (a silent Redis,
not a busy one; an event loop running late, or more than HEDGE_MAX_IN_FLIGHT reads
waiting, is busy too), each read of that call of a
job this reader served from the cache within the TTL answers from the DB (cold jobs are
never hedged: their one DB read is the lease holder's); the late Redis answer still
settles the breaker (which waits for the full socket timeout) and, where it granted a
lease, fills with that DB row. Until Redis answers again (or the breaker changes state),
new reads of warm jobs go to the DB without waiting the hedge delay: only the reads of
the first silent call pay it.

DB reads that only answer a request (a failed or hedged read, an open breaker; not the
lease holder's read, which fills) share one DB read per job when they overlap, but a read
never joins a DB read that began before it did: it could miss a write that it must see.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from functools import partial
from typing import Any

from anyio import to_thread
from redis.asyncio import Redis as AsyncRedis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from shared.cache import scripts
from shared.cache.backend import _SHAS as SCRIPT_SHAS
from shared.cache.backend import failure_of, split_batch
from shared.cache.connection import async_client, renew_async
from shared.cache.core import CachedJob, JobCache
from shared.cache.errors import ErrorClass
from shared.cache.machine import (
    Effect,
    Failed,
    FillEntry,
    Foreign,
    Hedged,
    Lease,
    LoadJob,
    Probe,
    ReadEntry,
    ReadReply,
    ReadResult,
    Sleep,
    Source,
)
from shared.cache.redis_url import Mode, parse_redis_url
from shared.cache.seal import Sealer
from shared.schemas import JobView

logger = logging.getLogger("shared.cache.redis_cache")

READ_JOB_KEYS = 4  # entry, lease, seal, floor
# At most this many reads per READ_JOBS call (a Lua script holds Redis while it runs).
MAX_BATCH = 64
# After a hedge, reads skip Redis while it stays silent, for at most this long: by then
# the silent call's socket timeout has opened the breaker, or Redis answered.
SILENCE_SECONDS = 1.0
# No hedging while more reads than this wait on Redis: a burst (a stampede on an
# evicted hot job, 200 polls at once) keeps the event loop itself from reading Redis's
# answer in time, and hedging it would send the burst to the DB (seen: 5-11 DB reads
# for 200 cold polls in `make bench`). A quiet outage has few reads in flight.
HEDGE_MAX_IN_FLIGHT = 16
# Jobs remembered as warm (served from the cache) per reader; forgotten all at once beyond.
MAX_WARM = 100_000


class _Silent:
    """A hedged read's outcome: Redis gave no answer in time; `late` gets the real one."""

    __slots__ = ("late",)

    def __init__(self, late: asyncio.Future[Any]) -> None:
        self.late = late


class _PendingRead:
    """One read in a Redis call: what it awaits, and after a hedge, where its late
    outcome goes."""

    __slots__ = ("args", "future", "late", "warm")

    def __init__(self, args: tuple[Any, ...], future: asyncio.Future[Any], warm: bool) -> None:
        self.args = args
        self.warm = warm  # hedged only when warm (see `AsyncJobReader._warm`)
        self.future = future
        self.late: asyncio.Future[Any] | None = None

    def hedge(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.late is None and not self.future.done():
            self.late = loop.create_future()
            self.future.set_result(_Silent(self.late))

    def deliver(self, outcome: Any) -> None:
        """The call's raw reply for this read, or the exception the read gets."""
        target = self.late if self.late is not None else self.future
        if target.done():
            return  # its request was cancelled
        if isinstance(outcome, asyncio.CancelledError):
            target.cancel()
        elif isinstance(outcome, Exception):
            target.set_result(outcome)  # a value: the read turns it into a `Failed`
        elif isinstance(outcome, BaseException):
            target.set_exception(outcome)
        else:
            target.set_result(outcome)


class _Timer:
    """A call's hedge timer, re-armed while Redis is busy rather than silent."""

    __slots__ = ("armed_at", "handle")

    def __init__(self) -> None:
        self.armed_at = 0.0
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop, delay: float, callback: Any, *args: Any) -> None:
        self.armed_at = loop.time()
        self.handle = loop.call_later(delay, callback, *args)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def connect_async(url: str, *, socket_timeout: float, mode: Mode = "standalone") -> Any:
    """An asyncio client with the same short timeouts and no hidden retries, for any
    REDIS_URL form (shared.cache.connection); `mode` is REDIS_MODE."""
    return async_client(parse_redis_url(url, mode), socket_timeout=socket_timeout)


class AsyncJobReader:
    """`JobCache.get` for the event loop; writes and rare paths stay on `JobCache`."""

    def __init__(
        self,
        cache: JobCache,
        client: AsyncRedis | None,
        *,
        batching: bool = True,
        split_by_slot: bool = False,
    ) -> None:
        self.cache = cache
        self.batching = batching
        self.split_by_slot = split_by_slot
        # Reads waiting for the next flush (one READ_JOBS call per event-loop tick).
        self._pending: list[_PendingRead] = []
        self._flush_scheduled = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.client = client if cache.backend is not None else None
        self.sealer = cache.backend.sealer if cache.backend is not None else Sealer()
        self._outages_seen = cache.breaker.outages
        self._background: set[asyncio.Task[Any]] = set()
        self._retired: list[AsyncRedis] = []
        self._last_answer = float("-inf")  # loop time of the last answer Redis gave
        # Since when Redis is silent (a call hedged, nothing answered since), and the
        # breaker's generation then (`_silent`).
        self._silent_since: float | None = None
        self._silent_generation = -1
        # Reads waiting for their Redis call's answer (not hedged yet).
        self._in_flight = 0
        # Jobs served from the cache: job id -> loop time of the read (`_is_warm`).
        self._warm: dict[int, float] = {}
        # DB reads in flight that answer requests only: job id -> (loop time begun, read).
        self._loads: dict[int, tuple[float, asyncio.Future[JobView | None]]] = {}

    async def get(self, job_id: int, *, client_id: str | None = None) -> CachedJob | None:
        """Like `JobCache.get`: None when missing or owned by another client."""
        job = (await self.read(job_id)).job
        if job is None or (client_id is not None and job.client_id != client_id):
            return None
        return job

    async def read(self, job_id: int) -> ReadResult:
        """Like `JobCache.read`, on the event loop."""
        cache = self.cache
        if self.client is None:
            return await to_thread.run_sync(cache.read, job_id)
        machine = cache.machine(job_id)
        started = asyncio.get_running_loop().time()
        reply: object = None
        try:
            while True:
                effect = machine.send(reply)
                reply = await self._perform(effect, started)
        except StopIteration as stop:
            result = stop.value
        if result.source is Source.CACHE:
            if len(self._warm) >= MAX_WARM:
                self._warm.clear()
            self._warm[job_id] = started
        if cache.flush_due():
            self._spawn(to_thread.run_sync(partial(cache.flush, wait=False)))
        assert isinstance(result, ReadResult)
        return result

    async def _perform(self, effect: Effect, started: float) -> object:
        cache = self.cache
        if isinstance(effect, ReadEntry):
            return await self._read(effect, started)
        if isinstance(effect, LoadJob):
            if effect.fill:
                return await to_thread.run_sync(cache._load_job, effect.job_id)
            return await self._load(effect.job_id, started)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Probe):
            # The probe (ping, then repair) runs beside the request, never inside it:
            # this poll and the others go to the DB until the probe closes the breaker.
            self._spawn(to_thread.run_sync(cache.recover, effect.ticket))
            return False
        return await to_thread.run_sync(cache._perform, effect)

    async def _read(self, effect: ReadEntry, started: float) -> ReadReply:
        if self._silent() and self._is_warm(effect.job_id, started):
            # A call of this reader has been silent past the hedge delay and Redis has
            # answered nothing since: this read does not queue behind it either.
            return Hedged(await self._load(effect.job_id, started))
        outcome = await self._submit(
            self._script_args(effect), warm=self._is_warm(effect.job_id, started)
        )
        if not isinstance(outcome, _Silent):
            return await self._reply(effect.job_id, outcome)
        # Redis is silent: answer from the DB; the late answer settles the breaker.
        loaded: asyncio.Future[JobView | None] = asyncio.get_running_loop().create_future()
        self._spawn(self._settle_late(effect, outcome.late, loaded))
        try:
            view = await self._load(effect.job_id, started)
        except BaseException:
            loaded.cancel()
            raise
        loaded.set_result(view)
        return Hedged(view)

    async def _settle_late(
        self,
        effect: ReadEntry,
        late: asyncio.Future[Any],
        loaded: asyncio.Future[JobView | None],
    ) -> None:
        outcome = await late
        reply = await self._reply(effect.job_id, outcome)
        self.cache.gate.settle(effect.ticket, reply)
        if isinstance(reply, Lease):
            with contextlib.suppress(asyncio.CancelledError):
                view = await loaded
                fill = FillEntry(effect.job_id, effect.token, reply.rev, view)
                await to_thread.run_sync(self.cache._perform, fill)

    async def _load(self, job_id: int, started: float) -> JobView | None:
        """The job from the DB, sharing a DB read of the same job begun at or after
        `started` (the read's own start): never one that may predate a write it must see."""
        shared = self._loads.get(job_id)
        if shared is None or shared[0] < started:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(to_thread.run_sync(self.cache._load_job, job_id))
            shared = (loop.time(), future)
            self._loads[job_id] = shared
            future.add_done_callback(partial(self._load_done, job_id))
        return await asyncio.shield(shared[1])

    def _load_done(self, job_id: int, future: asyncio.Future[Any]) -> None:
        shared = self._loads.get(job_id)
        if shared is not None and shared[1] is future:
            del self._loads[job_id]

    def _script_args(self, effect: ReadEntry) -> tuple[Any, ...]:
        cache = self.cache
        keys = cache.keys
        job_id = effect.job_id
        return (
            keys.job(job_id),
            keys.lease(job_id),
            keys.seal(job_id),
            keys.floor(job_id),
            effect.token,
            cache.policy.lease_ms,
            cache.policy.incarnation,
        )

    async def _reply(self, job_id: int, outcome: Any) -> ReadReply:
        """A READ_JOB outcome (its raw reply, or the exception it raised) as a result
        (see `backend.RedisBackend.read_job`)."""
        if not isinstance(outcome, BaseException):
            backend = self.cache.backend
            assert backend is not None
            return backend.read_reply(job_id, outcome)
        if isinstance(outcome, ResponseError):
            if "WRONGTYPE" in str(outcome):
                # The script touches four keys: blaming the entry would drop a good value
                # and meet the foreign one again on every poll.
                backend = self.cache.backend
                assert backend is not None
                return Foreign(await to_thread.run_sync(backend.read_job_culprit, job_id))
            return failure_of(outcome)
        if isinstance(outcome, TimeoutError | RedisError | OSError):
            return failure_of(outcome)
        if isinstance(outcome, Exception):  # any client surprise is a failed call
            return Failed(ErrorClass.UNAVAILABLE, outcome)
        raise outcome

    def _drop_idle_connections(self) -> None:
        """Forget pooled connections made before an outage (any path may have seen it).

        After Redis restarts, redis.asyncio's pool check does not notice that an idle
        connection's server is gone: each one failed on first use, and every failure
        reopened the breaker (one outage per stale connection, seen on SIGKILL + restart).
        Disconnecting the live pool raced with requests taking connections from it (a
        connection closed under a request, a close that timed out into the request), so
        the reader swaps in a fresh pool instead: requests in flight finish on the old
        one, which is closed in the background, where its errors cannot reach anyone.
        """
        assert self.client is not None
        self._outages_seen = self.cache.breaker.outages
        old = self.client
        self.client = renew_async(old)  # type: ignore[assignment]
        self._retired.append(old)
        self._spawn(self._retire(old))

    def _submit(self, args: tuple[Any, ...], *, warm: bool) -> asyncio.Future[Any]:
        """The READ_JOB outcome for `args` (its raw reply, or the exception it raised as a
        value), or `_Silent` when the call is hedged.

        With batching on, from one READ_JOBS call with the other reads that arrive within
        this event-loop tick (README "Performance": batching). The flush is scheduled with
        `call_soon`, never a timer: a lone read goes out on the next loop iteration.
        """
        cache = self.cache
        if cache.breaker.outages != self._outages_seen:
            self._drop_idle_connections()
        read = _PendingRead(args, asyncio.get_running_loop().create_future(), warm)
        self._in_flight += 1
        read.future.add_done_callback(self._landed)
        if not self.batching:
            self._spawn(self._run_batch([read]))
            return read.future
        self._pending.append(read)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return read.future

    def _landed(self, _future: asyncio.Future[Any]) -> None:
        self._in_flight -= 1

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._flush_scheduled = False
        for group in self._groups(pending):
            self.batch_sizes[len(group)] += 1
            self._spawn(self._run_batch(group))

    def _groups(self, pending: list[_PendingRead]) -> list[list[_PendingRead]]:
        """Calls of at most MAX_BATCH reads, each (on a Redis Cluster) in one hash slot: a
        script runs in one slot, and one huge script would hold Redis for every client."""
        groups: list[list[_PendingRead]]
        if self.split_by_slot:
            slots: dict[int, list[_PendingRead]] = {}
            for read in pending:
                slots.setdefault(key_slot(str(read.args[0]).encode()), []).append(read)
            groups = list(slots.values())
        else:
            groups = [pending]
        return [
            group[start : start + MAX_BATCH]
            for group in groups
            for start in range(0, len(group), MAX_BATCH)
        ]

    async def _run_batch(self, group: list[_PendingRead]) -> None:
        loop = asyncio.get_running_loop()
        hedge = self.cache.policy.hedge_ms / 1000
        timer = _Timer()
        if hedge > 0:
            timer.arm(loop, hedge, self._silence, group, timer)
        try:
            if len(group) == 1:
                outcomes: list[Any] = [await self._evalsha(group[0].args)]
            else:
                first = group[0].args
                keys = [key for read in group for key in read.args[:READ_JOB_KEYS]]
                argv = (first[5], first[6], *(read.args[4] for read in group))
                replies = await self._evalsha_script("read_jobs", scripts.READ_JOBS, keys, argv)
                outcomes = split_batch(replies, len(group))
            self._last_answer = loop.time()
        except BaseException as exc:
            if isinstance(exc, ResponseError):
                self._last_answer = loop.time()  # Redis answered, with an error
            for read in group:
                read.deliver(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            timer.cancel()
        for read, outcome in zip(group, outcomes, strict=True):
            read.deliver(outcome)

    def _silence(self, group: list[_PendingRead], timer: _Timer) -> None:
        """The hedge delay passed without an answer to this call: hedge its reads, unless
        Redis is busy rather than silent (another call was answered meanwhile, or the
        event loop itself ran late, or a burst of reads waits: hedging would only move
        load to the DB)."""
        loop = asyncio.get_running_loop()
        hedge = self.cache.policy.hedge_ms / 1000
        armed = timer.armed_at
        if (
            self._last_answer >= armed
            or loop.time() - armed > 2 * hedge
            or self._in_flight > HEDGE_MAX_IN_FLIGHT
        ):
            timer.arm(loop, hedge, self._silence, group, timer)
            return
        self._silent_since = armed
        self._silent_generation = self.cache.breaker.generation
        for read in group:
            if read.warm:
                read.hedge(loop)

    def _is_warm(self, job_id: int, now: float) -> bool:
        """Whether this reader served the job from the cache within the last TTL: only
        such reads are hedged. A cold job's read waits for Redis: its DB read belongs to
        the lease holder alone (one DB read per job per lease period, even when an
        overloaded machine keeps Redis's answer from us for longer than the hedge)."""
        hit = self._warm.get(job_id)
        return hit is not None and now - hit < self.cache.policy.ttl_seconds

    def _silent(self) -> bool:
        """Whether Redis is silent: a call was hedged, nothing answered since, the breaker
        has not changed state since (its late failure opens it; a probe closes it), and
        it was at most SILENCE_SECONDS ago."""
        since = self._silent_since
        return (
            since is not None
            and self._last_answer < since
            and self.cache.breaker.generation == self._silent_generation
            and asyncio.get_running_loop().time() - since < SILENCE_SECONDS
        )

    async def _evalsha_script(
        self, name: str, source: str, keys: list[Any], argv: tuple[Any, ...]
    ) -> Any:
        assert self.client is not None
        try:
            return await self.client.evalsha(SCRIPT_SHAS[name], len(keys), *keys, *argv)
        except NoScriptError:
            await self.client.script_load(source)
            return await self.client.evalsha(SCRIPT_SHAS[name], len(keys), *keys, *argv)

    async def _evalsha(self, args: tuple[Any, ...]) -> Any:
        assert self.client is not None
        try:
            return await self.client.evalsha(SCRIPT_SHAS["read_job"], READ_JOB_KEYS, *args)
        except NoScriptError:
            await self.client.script_load(scripts.READ_JOB)
            return await self.client.evalsha(SCRIPT_SHAS["read_job"], READ_JOB_KEYS, *args)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retire(self, client: AsyncRedis) -> None:
        """Close a retired client once its last requests had time to finish."""
        await asyncio.sleep(5)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await client.aclose()
        if client in self._retired:
            self._retired.remove(client)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for client in self._retired:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await client.aclose()
        self._retired.clear()
        if self.client is not None:
            await self.client.aclose()
