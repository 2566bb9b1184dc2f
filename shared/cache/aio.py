"""The cached poll on asyncio: one EVALSHA per hit, no thread hop.

Measured on this machine (FastAPI, 1 worker, wrk -c32): a redis.asyncio GET in an
`async def` handler serves ~1.9x the requests of a sync redis-py GET in a `def`
handler (the threadpool hop and GIL hand-offs cost more than the request itself).
So the hot read runs here, on the event loop, with the same Lua script, breaker,
statistics and policy as the synchronous `JobCache`, which it wraps. Everything
rare (the DB read on a miss, the fill, the breaker's repair probe) is delegated to
the synchronous cache in a worker thread: those paths are already correct there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

from anyio import to_thread
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError

from shared.cache import scripts
from shared.cache.backend import _SHAS as SCRIPT_SHAS
from shared.cache.breaker import Permit
from shared.cache.connection import async_client, renew_async
from shared.cache.core import CachedJob, JobCache
from shared.cache.errors import CacheError, CorruptEntry
from shared.cache.redis_url import Mode, parse_redis_url
from shared.cache.seal import Sealer

logger = logging.getLogger("shared.cache.redis_cache")

READ_JOB_KEYS = 4  # entry, lease, stats, seal


def connect_async(url: str, *, socket_timeout: float, mode: Mode = "standalone") -> Any:
    """An asyncio client with the same short timeouts and no hidden retries, for any
    REDIS_URL form (shared.cache.connection); `mode` is REDIS_MODE."""
    return async_client(parse_redis_url(url, mode), socket_timeout=socket_timeout)


class AsyncJobReader:
    """`JobCache.get` for the event loop; writes and rare paths stay on `JobCache`."""

    def __init__(self, cache: JobCache, client: AsyncRedis | None) -> None:
        self.cache = cache
        self.client = client if cache.backend is not None else None
        self.sealer = cache.backend.sealer if cache.backend is not None else Sealer()
        self._outages_seen = cache.breaker.outages
        self._background: set[asyncio.Task[Any]] = set()
        self._retired: list[AsyncRedis] = []

    async def get(self, job_id: int, *, client_id: str | None = None) -> CachedJob | None:
        """Like `JobCache.get`: None when missing or owned by another client."""
        job = await self._get(job_id)
        if job is None or (client_id is not None and job.view.client_id != client_id):
            return None
        return job

    async def _get(self, job_id: int) -> CachedJob | None:
        cache = self.cache
        if self.client is None:
            return await to_thread.run_sync(cache.get, job_id)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + cache.policy.wait_seconds
        delay = 0.002
        while True:
            permit = cache.breaker.acquire()
            if permit is Permit.PROBE:
                # The probe (ping, then repair) runs beside the request, never inside it:
                # this poll and the others go to the DB until the probe closes the breaker.
                self._probe_in_background()
                permit = None
            if permit is None:
                return await self._from_db(job_id)
            if cache.breaker.outages != self._outages_seen:
                await self._drop_idle_connections()
            deltas = cache._pending.take()
            try:
                code, raw, seal = await self._read(job_id, token, deltas)
            except CorruptEntry as corrupt:
                # `_read` put back whatever deltas did not land; none may count twice.
                await to_thread.run_sync(
                    partial(cache._drop_corrupt, corrupt.key, counted_hit=False)
                )
                continue
            except CacheError as exc:
                cache._pending.restore(deltas)
                if isinstance(exc.__cause__, MaxConnectionsError):
                    # Our own pool is full (a burst), Redis is fine: this request goes
                    # to the DB, the breaker stays closed for everyone else.
                    return await self._from_db(job_id)
                cache._pending.add("errors")
                cache.breaker.failure(exc)
                return await self._from_db(job_id)
            cache.breaker.success()
            if code == 0 and raw is not None:
                sealed = self.sealer.verify(cache.keys.job(job_id), raw, seal)
                cached = cache._decode(job_id, raw) if sealed else None
                if cached is not None:
                    return cached
                await to_thread.run_sync(
                    lambda: cache._drop_corrupt(cache.keys.job(job_id), counted_hit=True)
                )
                continue
            if code == 1:
                return await to_thread.run_sync(cache._fill, job_id, token)
            if time.monotonic() >= deadline:
                return await self._from_db(job_id)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

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
        task = asyncio.create_task(self._retire(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _from_db(self, job_id: int) -> CachedJob | None:
        self.cache._pending.add("misses")
        return await to_thread.run_sync(self.cache._from_db, job_id)

    async def _read(
        self, job_id: int, token: str, deltas: Mapping[str, int]
    ) -> tuple[int, bytes | None, bytes | None]:
        """(code, value, seal) of the READ_JOB script (see `backend.RedisBackend.read_job`)."""
        assert self.client is not None
        keys = self.cache.keys
        args = (
            keys.job(job_id),
            keys.lease(job_id),
            keys.stats(),
            keys.seal(job_id),
            token,
            self.cache.policy.lease_ms,
        )
        landed = True
        try:
            if deltas:
                reply, landed = await self._read_with_deltas(args, deltas)
                if isinstance(reply, Exception):
                    raise reply
            else:
                reply = await self._evalsha(args)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                if not landed:
                    self.cache._pending.restore(deltas)
                # The script also touches the stats hash and the seal: blaming the entry
                # would drop a good value and meet the foreign one again on every poll.
                backend = self.cache.backend
                assert backend is not None
                culprit = await to_thread.run_sync(backend.read_job_culprit, job_id)
                raise CorruptEntry(culprit) from exc
            raise CacheError(f"ResponseError: {exc}") from exc
        except (TimeoutError, RedisError, OSError) as exc:
            raise CacheError(f"{type(exc).__name__}: {exc}") from exc
        code = int(reply[0])
        return (0, reply[1], reply[2]) if code == 0 else (code, None, None)

    async def _evalsha(self, args: tuple[Any, ...]) -> Any:
        assert self.client is not None
        try:
            return await self.client.evalsha(SCRIPT_SHAS["read_job"], READ_JOB_KEYS, *args)
        except NoScriptError:
            await self.client.script_load(scripts.READ_JOB)
            return await self.client.evalsha(SCRIPT_SHAS["read_job"], READ_JOB_KEYS, *args)

    async def _read_with_deltas(
        self, args: tuple[Any, ...], deltas: Mapping[str, int]
    ) -> tuple[Any, bool]:
        """The script's reply (an exception object if it failed), and whether the
        statistics deltas sent ahead of it in the same pipeline landed."""
        assert self.client is not None
        async with self.client.pipeline(transaction=False) as pipe:
            for field, amount in deltas.items():
                pipe.hincrby(self.cache.keys.stats(), field, amount)
            # Not `pipe.evalsha`: redis-py's cluster pipeline blocks that method.
            pipe.execute_command("EVALSHA", SCRIPT_SHAS["read_job"], READ_JOB_KEYS, *args)
            results = await pipe.execute(raise_on_error=False)
        landed = not any(isinstance(r, Exception) for r in results[:-1])
        reply = results[-1]
        if isinstance(reply, NoScriptError):
            return await self._evalsha(args), landed
        return reply, landed

    def _probe_in_background(self) -> None:
        task = asyncio.create_task(to_thread.run_sync(self.cache.recover))
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
