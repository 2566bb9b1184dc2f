"""The Redis backend: with `aio`, the only module that imports `redis`.

Every Redis failure (refused, reset, timed out, protocol, wrong type) leaves this module
as a result (`machine.Failed` with its `ErrorClass`, or `machine.Foreign` naming the key
of the wrong type), never as a redis exception; nothing here decides to degrade,
`machine.Gate` does. Each public method is one network round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import (
    MaxConnectionsError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from shared.cache import scripts
from shared.cache.connection import sync_client
from shared.cache.errors import CacheError, ErrorClass, classify_response
from shared.cache.keys import KeySpace
from shared.cache.machine import (
    TOMBSTONE,
    Busy,
    Done,
    Failed,
    Foreign,
    Hit,
    Lease,
    ReadReply,
    Stored,
    WriteReply,
)
from shared.cache.redis_url import Mode, parse_redis_url
from shared.cache.seal import Sealer, page_key
from shared.cache.stats import FIELDS, Batch, since_text

_SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.ALL.items()}  # noqa: S324

BATCH_MARKER_SECONDS = 86_400

Call = tuple[str, tuple[Any, ...]]


def connect(url: str, *, socket_timeout: float, mode: Mode = "standalone") -> Any:
    """A client with short timeouts and no hidden retries (the breaker decides), for any
    REDIS_URL form (shared.cache.connection); `mode` is REDIS_MODE."""
    return sync_client(parse_redis_url(url, mode), socket_timeout=socket_timeout)


class CallFailed(CacheError):
    """A round trip failed; `reply` says how (`Failed` or `Foreign`)."""

    def __init__(self, reply: Failed | Foreign) -> None:
        super().__init__(f"a Redis call failed ({type(reply).__name__})")
        self.reply = reply


def failure_of(exc: BaseException) -> Failed:
    """The error class of an exception raised by a redis client (sync or asyncio)."""
    if isinstance(exc, MaxConnectionsError):
        return Failed(ErrorClass.OVERLOAD, exc)
    if isinstance(exc, ReadOnlyError):
        return Failed(ErrorClass.UNAVAILABLE, exc)
    if isinstance(exc, ResponseError):
        return Failed(classify_response(str(exc)), exc)
    return Failed(ErrorClass.UNAVAILABLE, exc)


def split_batch(replies: Any, count: int) -> list[Any]:
    """A READ_JOBS reply as one READ_JOB reply per read, or a `ResponseError` for a read
    whose keys failed in Redis (raised by a single READ_JOB as that error)."""
    if not isinstance(replies, list) or len(replies) != count:
        raise ResponseError("READ_JOBS answered an unexpected shape")
    return [ResponseError(_text(reply[1])) if int(reply[0]) == 3 else reply for reply in replies]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisBackend:
    """Cache operations on one Redis (a client is handed in: tests pass fakeredis)."""

    def __init__(self, client: redis.Redis, keys: KeySpace, sealer: Sealer | None = None) -> None:
        self.client = client
        self.keys = keys
        self.sealer = sealer or Sealer()

    # -- plumbing -----------------------------------------------------------------------

    def _run(self, calls: Sequence[Call]) -> list[Any]:
        """Run commands (and `("script", name, ...)` calls) in one pipelined round trip.

        A Redis restart forgets scripts: on NOSCRIPT they are loaded and the calls that
        failed re-run once. Only those: the others already ran in the same round trip, and
        one of them may be a PUBLISH, which every subscriber would otherwise get twice.
        Raises `CallFailed`.
        """
        try:
            results = self._pipeline(calls)
            missed = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missed:
                for name, source in scripts.ALL.items():
                    if _SHAS[name] != self.client.script_load(source):
                        raise CacheError("Redis computed a different script digest")
                again = self._pipeline([calls[i] for i in missed])
                for i, result in zip(missed, again, strict=True):
                    results[i] = result
        except CacheError as exc:
            raise CallFailed(Failed(ErrorClass.UNAVAILABLE, exc)) from exc
        except (RedisError, OSError) as exc:
            raise CallFailed(self._failure(exc, calls)) from exc
        for result in results:
            if isinstance(result, Exception):
                raise CallFailed(self._failure(result, calls)) from result
        return results

    def _failure(self, exc: BaseException, calls: Sequence[Call]) -> Failed | Foreign:
        if isinstance(exc, ReadOnlyError):
            # A demoted master: drop the pooled connections, the next call reconnects.
            self.client.connection_pool.disconnect()
        if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc) and calls:
            return Foreign(self._foreign_key(calls[0]))
        return failure_of(exc)

    def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for command, args in calls:
            if command == "script":
                name, keys, argv = args
                # Not `pipe.evalsha`: redis-py's cluster pipeline blocks that method.
                pipe.execute_command("EVALSHA", _SHAS[name], len(keys), *keys, *argv)  # type: ignore[no-untyped-call]
            else:
                pipe.execute_command(command, *args)  # type: ignore[no-untyped-call]
        return list(pipe.execute(raise_on_error=False))

    def _foreign_key(self, call: Call) -> str:
        """The key of `call` holding a value of the wrong type.

        WRONGTYPE does not say which key: a script touches its entry, its lease, its seal
        and its floor. Blaming the first key would drop a good entry and keep the foreign
        value, so every later read would fail again; one TYPE round trip finds the culprit.
        """
        if call[0] == "script":
            _, keys, _ = call[1]
        else:
            keys = call[1][:1]
        hashes = {self.keys.stats()}
        hashes.update(str(k) for k in keys if str(k).endswith(":floor"))
        if call[0] == "script" and call[1][0] in ("read_list", "fill_list"):
            hashes.add(str(keys[0]))
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.type(key)
            types = pipe.execute()
        except (RedisError, OSError):
            return str(keys[0])
        for key, found in zip(keys, types, strict=True):
            kind = _text(found)
            if kind not in ("none", "hash" if str(key) in hashes else "string"):
                return str(key)
        return str(keys[0])

    def _job_keys(self, job_id: int) -> tuple[str, str, str, str]:
        k = self.keys
        return (k.job(job_id), k.lease(job_id), k.seal(job_id), k.floor(job_id))

    # -- jobs ---------------------------------------------------------------------------

    def read_job(self, job_id: int, token: str, lease_ms: int, incarnation: str) -> ReadReply:
        """The READ_JOB script's answer as a result (see `machine`)."""
        keys = self._job_keys(job_id)
        try:
            (reply,) = self._run([("script", ("read_job", keys, (token, lease_ms, incarnation)))])
        except CallFailed as failed:
            return failed.reply
        return self.read_reply(job_id, reply)

    def read_jobs(
        self, reads: Sequence[tuple[int, str]], lease_ms: int, incarnation: str
    ) -> list[ReadReply]:
        """`read_job` for several (job id, token) reads in one READ_JOBS call: each read's
        answer is what `read_job` would have answered; a failed call fails every read."""
        keys = [key for job_id, _ in reads for key in self._job_keys(job_id)]
        argv = (lease_ms, incarnation, *(token for _, token in reads))
        try:
            (replies,) = self._run([("script", ("read_jobs", tuple(keys), argv))])
        except CallFailed as failed:
            return [failed.reply] * len(reads)
        answers: list[ReadReply] = []
        for (job_id, _), reply in zip(reads, split_batch(replies, len(reads)), strict=True):
            if not isinstance(reply, ResponseError):
                answers.append(self.read_reply(job_id, reply))
            elif "WRONGTYPE" in str(reply):
                answers.append(Foreign(self.read_job_culprit(job_id)))
            else:
                answers.append(failure_of(reply))
        return answers

    def read_reply(self, job_id: int, reply: Any) -> ReadReply:
        """Decode a raw READ_JOB reply (also used by the asyncio reader)."""
        code = int(reply[0])
        if code == 0:
            value = bytes(reply[1])
            return Hit(value, self.sealer.verify(self.keys.job(job_id), value, reply[2]))
        if code == 1:
            return Lease(_text(reply[1]))
        return Busy(int(reply[1]))

    def read_job_culprit(self, job_id: int) -> str:
        """After WRONGTYPE from `read_job` elsewhere (the async reader): the guilty key."""
        return self._foreign_key(("script", ("read_job", self._job_keys(job_id), ())))

    def fill_job(
        self,
        job_id: int,
        token: str,
        rev: str,
        version: int,
        value: bytes,
        ttl: int,
        incarnation: str,
        floor_ttl: int,
    ) -> WriteReply:
        """A reader's fill (version 0 and an empty value: a tombstone)."""
        keys = self._job_keys(job_id)
        seal = self.sealer.seal(keys[0], value)
        argv = (version, value, ttl, token, seal, incarnation, rev, floor_ttl)
        try:
            (stored,) = self._run([("script", ("fill_job", keys, argv))])
        except CallFailed as failed:
            return failed.reply
        return Stored(bool(stored))

    def fill_missing(
        self, job_id: int, token: str, rev: str, ttl: int, incarnation: str
    ) -> WriteReply:
        """Cache "no such job" for `ttl` seconds (a tombstone a write overrides)."""
        return self.fill_job(job_id, token, rev, 0, TOMBSTONE, ttl, incarnation, ttl)

    def write_job(
        self,
        job_id: int,
        client_id: str,
        version: int,
        value: bytes,
        ttl: int,
        incarnation: str,
        floor_ttl: int,
    ) -> WriteReply:
        """Pre-warm (versioned, revoking fill leases) and publish if stored, and drop the
        owner's lists: one round trip."""
        k = self.keys
        keys = self._job_keys(job_id)
        seal = self.sealer.seal(keys[0], value)
        argv = (version, value, ttl, seal, incarnation, floor_ttl, k.channel(job_id))
        try:
            stored, _ = self._run(
                [("script", ("write_job", keys, argv)), ("DEL", (k.jobs(client_id),))]
            )
        except CallFailed as failed:
            return failed.reply
        return Stored(bool(stored))

    def drop_job(self, job_id: int, *, revoke: bool, floor_ttl: int) -> WriteReply:
        """Drop the entry, seal and lease; `revoke` also refuses fills in flight."""
        keys = self._job_keys(job_id)
        try:
            self._run([("script", ("drop_job", keys, ("1" if revoke else "0", floor_ttl)))])
        except CallFailed as failed:
            return failed.reply
        return Done()

    def drop_keys(self, keys: Sequence[str]) -> WriteReply:
        try:
            self._run([("DEL", (key,)) for key in keys])
        except CallFailed as failed:
            return failed.reply
        return Done()

    def delete(self, keys: Sequence[str]) -> int:
        """DEL each key (one slot per command); raises `CallFailed` (for the repair)."""
        if not keys:
            return 0
        return sum(int(n) for n in self._run([("DEL", (key,)) for key in keys]))

    # -- lists --------------------------------------------------------------------------

    def read_list(
        self, client_id: str, page: str, epoch: str, ttl: int
    ) -> tuple[str, Hit | None] | Failed | Foreign:
        keys = (self.keys.jobs(client_id),)
        try:
            (reply,) = self._run([("script", ("read_list", keys, (page, epoch, ttl)))])
        except CallFailed as failed:
            return failed.reply
        current = _text(reply[0])
        if len(reply) < 2:
            return current, None
        value = bytes(reply[1])
        return current, Hit(value, self.sealer.verify(page_key(keys[0], page), value, reply[2]))

    def fill_list(self, client_id: str, epoch: str, page: str, value: bytes) -> WriteReply:
        keys = (self.keys.jobs(client_id),)
        seal = self.sealer.seal(page_key(keys[0], page), value)
        try:
            (stored,) = self._run([("script", ("fill_list", keys, (epoch, page, value, seal)))])
        except CallFailed as failed:
            return failed.reply
        return Stored(bool(stored))

    # -- statistics and health ------------------------------------------------------------

    def flush_stats(self, batches: Sequence[Batch]) -> list[WriteReply]:
        """Send each batch once (see `scripts.FLUSH_STATS`); a result per batch."""
        replies: list[WriteReply] = []
        for batch in batches:
            keys = (self.keys.stats(), self.keys.stats_batch(batch.batch_id))
            argv: list[Any] = [BATCH_MARKER_SECONDS]
            for field, amount in batch.counts:
                argv += [field, amount]
            try:
                (reply,) = self._run([("script", ("flush_stats", keys, tuple(argv)))])
            except CallFailed as failed:
                replies.append(failed.reply)
                continue
            if int(reply[1]):
                replies.append(Failed(ErrorClass.DATA, CacheError("non-integer counter reset")))
            else:
                replies.append(Done())
        return replies

    def counters(self) -> tuple[dict[str, int], str | None] | Failed | Foreign:
        """The global counters and since when they run."""
        try:
            (raw,) = self._run([("HGETALL", (self.keys.stats(),))])
        except CallFailed as failed:
            return failed.reply
        counts: dict[str, int] = {}
        for key, value in raw.items():
            name = _text(key)
            if name in FIELDS:
                try:
                    counts[name] = int(value)
                except ValueError:
                    counts[name] = 0
        return counts, since_text(raw.get(b"since", raw.get("since")))

    def reset_counters(self) -> None:
        self._run([("DEL", (self.keys.stats(),))])

    def ping(self) -> None:
        """Raises `CallFailed` unless Redis answers."""
        self._run([("PING", ())])

    def close(self) -> None:
        self.client.close()
