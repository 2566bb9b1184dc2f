"""The cached poll on asyncio: one EVALSHA per hit, no thread hop.

Measured on this machine (FastAPI, 1 worker, wrk -c32): a redis.asyncio GET in an
`async def` handler serves ~1.9x the requests of a sync redis-py GET in a `def`
handler (the threadpool hop and GIL hand-offs cost more than the request itself).
So the hot read runs here, on the event loop: the same sans-IO machine as the
synchronous `JobCache` (`machine.read_job`), driven by awaits. Everything rare (the DB
read, the fill, a drop, the breaker's repair probe) runs on the synchronous cache in a
worker thread; the probe runs beside the request, never inside it.

Hedged read: when Redis has given no answer at all (to any read of this reader) within
`CachePolicy.hedge_ms`, the request reads the DB and answers from it; the late Redis
answer still settles the breaker (which waits for the full socket timeout) and, if it
granted the lease, fills with that DB row. A Redis that answers other reads meanwhile is
busy, not silent: the request keeps waiting (hedging a burst would only load the DB).
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
)
from shared.cache.redis_url import Mode, parse_redis_url
from shared.cache.seal import Sealer
from shared.schemas import JobView

logger = logging.getLogger("shared.cache.redis_cache")

READ_JOB_KEYS = 4  # entry, lease, seal, floor


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
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.client = client if cache.backend is not None else None
        self.sealer = cache.backend.sealer if cache.backend is not None else Sealer()
        self._outages_seen = cache.breaker.outages
        self._background: set[asyncio.Task[Any]] = set()
        self._retired: list[AsyncRedis] = []
        self._last_answer = float("-inf")  # loop time of the last answer Redis gave

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
        reply: object = None
        try:
            while True:
                effect = machine.send(reply)
                reply = await self._perform(effect)
        except StopIteration as stop:
            result = stop.value
        if cache.flush_due():
            self._spawn(to_thread.run_sync(partial(cache.flush, wait=False)))
        assert isinstance(result, ReadResult)
        return result

    async def _perform(self, effect: Effect) -> object:
        cache = self.cache
        if isinstance(effect, ReadEntry):
            return await self._read(effect)
        if isinstance(effect, LoadJob):
            return await to_thread.run_sync(cache._load_job, effect.job_id)
        if isinstance(effect, Sleep):
            await asyncio.sleep(effect.seconds)
            return None
        if isinstance(effect, Probe):
            # The probe (ping, then repair) runs beside the request, never inside it:
            # this poll and the others go to the DB until the probe closes the breaker.
            self._spawn(to_thread.run_sync(cache.recover, effect.ticket))
            return False
        return await to_thread.run_sync(cache._perform, effect)

    async def _read(self, effect: ReadEntry) -> ReadReply:
        hedge = self.cache.policy.hedge_ms
        if hedge <= 0:
            return await self._read_entry(effect)
        task = asyncio.ensure_future(self._read_entry(effect))
        loop = asyncio.get_running_loop()
        while True:
            waited_since = loop.time()
            done, _ = await asyncio.wait({task}, timeout=hedge / 1000)
            if task in done:
                return task.result()
            # Busy, not silent: other reads got answers meanwhile, or the event loop itself
            # ran late (a burst queues on the loop and on Redis). Hedging then would only
            # move load to the DB.
            loop_late = loop.time() - waited_since > 2 * hedge / 1000
            if self._last_answer < waited_since and not loop_late:
                break
        # Redis is silent: answer from the DB; the late answer settles the breaker.
        loaded: asyncio.Future[JobView | None] = asyncio.get_running_loop().create_future()
        self._spawn(self._settle_late(effect, task, loaded))
        try:
            view = await to_thread.run_sync(self.cache._load_job, effect.job_id)
        except BaseException:
            loaded.cancel()
            raise
        loaded.set_result(view)
        return Hedged(view)

    async def _settle_late(
        self,
        effect: ReadEntry,
        task: asyncio.Future[ReadReply],
        loaded: asyncio.Future[JobView | None],
    ) -> None:
        reply = await task
        self.cache.gate.settle(effect.ticket, reply)
        if isinstance(reply, Lease):
            with contextlib.suppress(asyncio.CancelledError):
                view = await loaded
                fill = FillEntry(effect.job_id, effect.token, reply.rev, view)
                await to_thread.run_sync(self.cache._perform, fill)

    async def _read_entry(self, effect: ReadEntry) -> ReadReply:
        """The READ_JOB script's answer as a result (see `backend.RedisBackend.read_job`)."""
        cache = self.cache
        if cache.breaker.outages != self._outages_seen:
            await self._drop_idle_connections()
        assert self.client is not None
        backend = cache.backend
        assert backend is not None
        keys = cache.keys
        job_id = effect.job_id
        args = (
            keys.job(job_id),
            keys.lease(job_id),
            keys.seal(job_id),
            keys.floor(job_id),
            effect.token,
            cache.policy.lease_ms,
            cache.policy.incarnation,
        )
        try:
            raw = await (self._batched(args) if self.batching else self._evalsha(args))
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                # The script touches four keys: blaming the entry would drop a good value
                # and meet the foreign one again on every poll.
                return Foreign(await to_thread.run_sync(backend.read_job_culprit, job_id))
            return failure_of(exc)
        except (TimeoutError, RedisError, OSError) as exc:
            return failure_of(exc)
        except Exception as exc:  # noqa: BLE001 -- any client surprise is a failed call
            return Failed(ErrorClass.UNAVAILABLE, exc)
        self._last_answer = asyncio.get_running_loop().time()
        return backend.read_reply(job_id, raw)

    async def _drop_idle_connections(self) -> None:
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

    def _batched(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """The READ_JOB reply for `args`, from one READ_JOBS call with the other reads that
        arrive within this event-loop tick (README "Performance": batching).

        The flush is scheduled with `call_soon`, never a timer: a lone read goes out on
        the next loop iteration. Each read gets its own reply or its own exception, the
        one a single READ_JOB would have raised; a failed call fails each of its reads.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._flush_scheduled = False
        for group in self._groups(pending):
            self.batch_sizes[len(group)] += 1
            self._spawn(self._run_batch(group))

    def _groups(
        self, pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> list[list[tuple[tuple[Any, ...], asyncio.Future[Any]]]]:
        """One group, or (on a Redis Cluster) one per hash slot: a script runs in one slot."""
        if not self.split_by_slot:
            return [pending]
        slots: dict[int, list[tuple[tuple[Any, ...], asyncio.Future[Any]]]] = {}
        for read in pending:
            slots.setdefault(key_slot(str(read[0][0]).encode()), []).append(read)
        return list(slots.values())

    async def _run_batch(self, group: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            if len(group) == 1:
                args, future = group[0]
                outcomes: list[Any] = [await self._evalsha(args)]
            else:
                first = group[0][0]
                keys = [key for args, _ in group for key in args[:READ_JOB_KEYS]]
                argv = (first[5], first[6], *(args[4] for args, _ in group))
                replies = await self._evalsha_script("read_jobs", scripts.READ_JOBS, keys, argv)
                outcomes = split_batch(replies, len(group))
        except BaseException as exc:
            for _, future in group:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue  # its request was cancelled
            if isinstance(outcome, ResponseError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

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
