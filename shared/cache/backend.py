"""The Redis backend: the only module that imports `redis`.

Every Redis failure (refused, reset, timed out, protocol, wrong type) leaves this
module as `CacheError`; nothing here decides to degrade, `core.JobCache` does.
Each public method is one network round trip; pending statistics deltas ride along.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from shared.cache import scripts
from shared.cache.connection import sync_client
from shared.cache.errors import CacheError, CorruptEntry
from shared.cache.keys import KeySpace
from shared.cache.redis_url import Mode, parse_redis_url
from shared.cache.seal import Sealer, page_key

_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.ALL.items()}  # noqa: S324


def connect(url: str, *, socket_timeout: float, mode: Mode = "standalone") -> Any:
    """A client with short timeouts and no hidden retries (the breaker decides), for any
    REDIS_URL form (shared.cache.connection); `mode` is REDIS_MODE."""
    return sync_client(parse_redis_url(url, mode), socket_timeout=socket_timeout)


class RedisBackend:
    """Cache operations on one Redis (a client is handed in: tests pass fakeredis)."""

    def __init__(self, client: redis.Redis, keys: KeySpace, sealer: Sealer | None = None) -> None:
        self.client = client
        self.keys = keys
        self.sealer = sealer or Sealer()

    # -- plumbing -----------------------------------------------------------------------

    def _run(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]], deltas: Mapping[str, int]
    ) -> list[Any]:
        """Run commands (and `("script", name, ...)` calls) in one pipelined round trip.

        A Redis restart forgets scripts: on NOSCRIPT they are loaded and the calls that
        failed re-run once. Only those: the others already ran in the same round trip, and
        one of them may be a PUBLISH, which every subscriber would otherwise get twice.
        Statistics deltas ride only once too.
        """
        try:
            results = self._pipeline(calls, deltas)
            missed = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missed:
                for name, source in scripts.ALL.items():
                    if _SHAS[name] != self.client.script_load(source):
                        raise CacheError("Redis computed a different script digest")
                again = self._pipeline([calls[i] for i in missed], {})
                for i, result in zip(missed, again, strict=True):
                    results[i] = result
        except ResponseError as exc:
            raise self._translate_response(exc, calls) from exc
        except (RedisError, OSError) as exc:
            raise CacheError(f"{type(exc).__name__}: {exc}") from exc
        for result in results:
            if isinstance(result, ResponseError):
                raise self._translate_response(result, calls) from result
            if isinstance(result, Exception):
                raise CacheError(f"{type(result).__name__}: {result}") from result
        return results

    def _pipeline(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]], deltas: Mapping[str, int]
    ) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        stats_key = self.keys.stats()
        for field, amount in deltas.items():
            pipe.hincrby(stats_key, field, amount)
        for command, args in calls:
            if command == "script":
                name, keys, argv = args
                # Not `pipe.evalsha`: redis-py's cluster pipeline blocks that method.
                pipe.execute_command("EVALSHA", _SHAS[name], len(keys), *keys, *argv)  # type: ignore[no-untyped-call]
            else:
                pipe.execute_command(command, *args)  # type: ignore[no-untyped-call]
        results = pipe.execute(raise_on_error=False)
        return list(results[len(deltas) :])

    def _translate_response(
        self, exc: ResponseError, calls: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> CacheError:
        if "WRONGTYPE" in str(exc):
            return CorruptEntry(self._foreign_key(calls[0]))
        return CacheError(f"ResponseError: {exc}")

    def _foreign_key(self, call: tuple[str, tuple[Any, ...]]) -> str:
        """The key of `call` holding a value of the wrong type.

        WRONGTYPE does not say which key: a script touches its entry, its lease and the
        stats hash. Blaming the first key would drop a good entry and keep the foreign
        value, so every later read would fail again; one TYPE round trip finds the culprit.
        """
        if call[0] == "script":
            name, keys, _ = call[1]
        else:
            name, keys = call[0], call[1][:1]
        hashes = {self.keys.stats()}
        if name in ("read_list", "fill_list"):
            hashes.add(str(keys[0]))
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            types = pipe.execute()
        except (RedisError, OSError):
            return str(keys[0])
        for key, found in zip(keys, types, strict=True):
            kind = found.decode() if isinstance(found, bytes) else str(found)
            if kind not in ("none", "hash" if str(key) in hashes else "string"):
                return str(key)
        return str(keys[0])

    # -- jobs ---------------------------------------------------------------------------

    def read_job(
        self, job_id: int, token: str, lease_ms: int, deltas: Mapping[str, int]
    ) -> tuple[int, bytes | None]:
        """(0, value) hit · (1, None) miss with the lease · (2, None) miss, another fills.

        A value whose seal does not verify was not written here by us: `CorruptEntry`
        (Redis counted it as a hit).
        """
        k = self.keys
        keys = (k.job(job_id), k.lease(job_id), k.stats(), k.seal(job_id))
        (reply,) = self._run([("script", ("read_job", keys, (token, lease_ms)))], deltas)
        code = int(reply[0])
        if code != 0:
            return code, None
        if not self.sealer.verify(keys[0], reply[1], reply[2]):
            raise CorruptEntry(keys[0], counted_hit=True)
        return 0, reply[1]

    def read_job_culprit(self, job_id: int) -> str:
        """After WRONGTYPE from `read_job` elsewhere (the async reader): the guilty key."""
        k = self.keys
        keys = (k.job(job_id), k.lease(job_id), k.stats(), k.seal(job_id))
        return self._foreign_key(("script", ("read_job", keys, ())))

    def fill_job(
        self,
        job_id: int,
        token: str,
        version: int,
        value: bytes,
        ttl: int,
        deltas: Mapping[str, int],
    ) -> bool:
        """Fill under our lease with a versioned compare-and-set; False when refused."""
        keys = (self.keys.job(job_id), self.keys.lease(job_id), self.keys.seal(job_id))
        seal = self.sealer.seal(keys[0], value)
        (stored,) = self._run(
            [("script", ("set_if_newer", keys, (version, value, ttl, token, seal)))], deltas
        )
        return bool(stored)

    def release_lease(self, job_id: int, token: str, deltas: Mapping[str, int]) -> None:
        self._run([("script", ("release_lease", (self.keys.lease(job_id),), (token,)))], deltas)

    def publish_job(
        self,
        job_id: int,
        client_id: str,
        version: int,
        value: bytes,
        ttl: int,
        deltas: Mapping[str, int],
    ) -> bool:
        """Pre-warm (versioned), drop the owner's lists, publish: one round trip."""
        k = self.keys
        keys = (k.job(job_id), k.lease(job_id), k.seal(job_id))
        seal = self.sealer.seal(keys[0], value)
        stored, _, _ = self._run(
            [
                ("script", ("set_if_newer", keys, (version, value, ttl, "", seal))),
                ("DEL", (k.jobs(client_id),)),
                ("PUBLISH", (k.channel(job_id), value)),
            ],
            deltas,
        )
        return bool(stored)

    def delete(self, keys: Sequence[str], deltas: Mapping[str, int]) -> int:
        if not keys:
            self._run([], deltas)
            return 0
        (count,) = self._run([("DEL", tuple(keys))], deltas)
        return int(count)

    # -- lists --------------------------------------------------------------------------

    def read_list(
        self, client_id: str, page: str, epoch: str, ttl: int, deltas: Mapping[str, int]
    ) -> tuple[str, bytes | None]:
        keys = (self.keys.jobs(client_id), self.keys.stats())
        (reply,) = self._run([("script", ("read_list", keys, (page, epoch, ttl)))], deltas)
        current = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if len(reply) < 2:
            return current, None
        if not self.sealer.verify(page_key(keys[0], page), reply[1], reply[2]):
            raise CorruptEntry(keys[0], counted_hit=True)
        return current, reply[1]

    def fill_list(
        self, client_id: str, epoch: str, page: str, value: bytes, deltas: Mapping[str, int]
    ) -> bool:
        keys = (self.keys.jobs(client_id),)
        seal = self.sealer.seal(page_key(keys[0], page), value)
        (stored,) = self._run([("script", ("fill_list", keys, (epoch, page, value, seal)))], deltas)
        return bool(stored)

    # -- statistics and health ------------------------------------------------------------

    def counters(self, deltas: Mapping[str, int]) -> dict[str, int]:
        (raw,) = self._run([("HGETALL", (self.keys.stats(),))], deltas)
        return {key.decode(): int(value) for key, value in raw.items()}

    def reset_counters(self) -> None:
        self._run([("DEL", (self.keys.stats(),))], {})

    def ping(self) -> None:
        self._run([("PING", ())], {})

    def close(self) -> None:
        self.client.close()
